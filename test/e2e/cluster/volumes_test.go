package cluster

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// volumeCase is one kind of PVC of flow 2.
type volumeCase struct {
	name, class string
	size        string
	block       bool
}

var volumeCases = []volumeCase{
	{"ext4", "ploop-ext4", "64Mi", false},
	{"xfs", "ploop-xfs", "320Mi", false}, // mkfs.xfs wants 300 MB at least
	{"block", "ploop-ext4", "64Mi", true},
	{"simfs", "simfs", "64Mi", false},
}

// The data a writer pod leaves and a later pod checks: 1 MiB, its digest
// beside it (a filesystem) or a pattern regenerated (a block device).
const (
	writeFS  = "head -c 1048576 /dev/urandom > /data/f && sha256sum /data/f > /data/f.sum && sync"
	readFS   = "cd /data && sha256sum -c f.sum"
	pattern  = "yes ploop-csi | head -c 1048576 > /tmp/p"
	writeDev = pattern + " && dd if=/tmp/p of=/dev/vol bs=1048576 count=1 conv=fsync"
	readDev  = pattern + " && head -c 1048576 /dev/vol | cmp - /tmp/p"
)

// testVolumes (flow 2): a PVC of each kind is used by a pod that writes
// data; the pod is deleted and another pod on the same PVC finds the data.
// Deleting the PVCs deletes their volumes.
func testVolumes(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	pods, pvcs := c.Clients.CoreV1().Pods("default"), c.Clients.CoreV1().PersistentVolumeClaims("default")
	for _, vc := range volumeCases {
		if _, err := pvcs.Create(ctx, newPVC("pvc-"+vc.name, vc), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	run := func(vc volumeCase, step, script string) {
		name := fmt.Sprintf("%s-%s", step, vc.name)
		if _, err := pods.Create(ctx, volumePod(name, "pvc-"+vc.name, vc.block, script), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	wait := func(vc volumeCase, step string) bool {
		name := fmt.Sprintf("%s-%s", step, vc.name)
		p := waitPod(ctx, t, c, name)
		if p.Status.Phase != corev1.PodSucceeded {
			t.Errorf("%s (%s, %s): %s (%s)", name, vc.class, vc.size, p.Status.Phase, podReason(p))
			return false
		}
		if err := pods.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Error(err)
		}
		return true
	}
	// All at once: the node stages them side by side.
	for _, vc := range volumeCases {
		script := writeFS
		if vc.block {
			script = writeDev
		}
		run(vc, "write", script)
	}
	var written []volumeCase
	for _, vc := range volumeCases {
		if wait(vc, "write") {
			written = append(written, vc)
		}
	}
	for _, vc := range written {
		script := readFS
		if vc.block {
			script = readDev
		}
		run(vc, "read", script)
	}
	for _, vc := range written {
		wait(vc, "read")
	}
	var pvNames []string
	for _, vc := range volumeCases {
		if pvc, err := pvcs.Get(ctx, "pvc-"+vc.name, metav1.GetOptions{}); err == nil && pvc.Spec.VolumeName != "" {
			pvNames = append(pvNames, pvc.Spec.VolumeName)
		}
		if err := pvcs.Delete(ctx, "pvc-"+vc.name, metav1.DeleteOptions{}); err != nil {
			t.Error(err)
		}
	}
	waitFor(ctx, t, "the PersistentVolumes to be deleted with their claims", func() error {
		for _, pv := range pvNames {
			if _, err := c.Clients.CoreV1().PersistentVolumes().Get(ctx, pv, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return fmt.Errorf("%s still exists (%v)", pv, err)
			}
		}
		return nil
	})
}

// newPVC is a claim of vc's class, size and mode.
func newPVC(name string, vc volumeCase) *corev1.PersistentVolumeClaim {
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: &vc.class,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(vc.size)}},
		},
	}
	if vc.block {
		mode := corev1.PersistentVolumeBlock
		pvc.Spec.VolumeMode = &mode
	}
	return pvc
}

// volumePod runs script on the tools image with the claim at /data (or
// its device at /dev/vol).
func volumePod(name, claim string, block bool, script string) *corev1.Pod {
	ctr := corev1.Container{Name: "c", Image: ToolsImage, ImagePullPolicy: corev1.PullNever, Command: []string{"sh", "-c", script},
		// A failing pod's output reaches the test in its status (the
		// API server has no way to the kubelet's logs).
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError}
	if block {
		ctr.VolumeDevices = []corev1.VolumeDevice{{Name: "v", DevicePath: "/dev/vol"}}
	} else {
		ctr.VolumeMounts = []corev1.VolumeMount{{Name: "v", MountPath: "/data"}}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			Containers:    []corev1.Container{ctr},
			Volumes: []corev1.Volume{{Name: "v", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}}}},
		},
	}
}

// signalReady lets pod's script say it saw what the test waits for, by
// touching /tmp/www/ready: busybox's httpd serves /tmp/www, and the
// readiness probe asks for /ready. (Not an exec probe: the guest's runc,
// whose containers cannot pivot_root out of the guest's chroot, runs an
// exec outside the container's root.)
func signalReady(p *corev1.Pod) {
	c := &p.Spec.Containers[0]
	c.Command[len(c.Command)-1] = "mkdir -p /tmp/www && httpd -p 8080 -h /tmp/www || exit 1\n" + c.Command[len(c.Command)-1]
	c.ReadinessProbe = &corev1.Probe{PeriodSeconds: 1,
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8080)}}}
}
