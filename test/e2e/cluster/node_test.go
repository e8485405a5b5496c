package cluster

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/ploop-csi/ploop-csi/test/e2e/helmbin"
)

// nodePluginSelector picks the node plugin's pods.
const nodePluginSelector = "app.kubernetes.io/name=ploop-csi,app.kubernetes.io/component=node"

// The writer of flow 6 rewrites files in place with the same pattern
// (so a file is whole whenever the writer is killed) with fsync, and reads
// each back, counting rounds on its volume; any error ends it with the
// failing step in its termination message, and leaves /data/error behind.
const restartWriter = pattern + `
fail() { echo "$*" | tee /data/error; exit 1; }
i=0; while :; do
	dd if=/tmp/p of=/data/f$((i%4)) bs=65536 conv=notrunc,fsync 2>/dev/null || fail "write $i failed"
	cmp /data/f$((i%4)) /tmp/p || fail "read $i differs"
	i=$((i+1)); echo $i > /data/rounds
	test $i -eq 5 && touch /tmp/www/ready
done`

// restartChecker runs after the writer on its volume.
const restartChecker = `test -e /data/error && { cat /data/error; exit 1; }
r=$(cat /data/rounds); echo "$r rounds"; test "$r" -ge 4 || exit 1
for f in /data/f0 /data/f1 /data/f2 /data/f3; do cmp $f /tmp/p || exit 1; done`

// testRestart (flow 6): the node plugin's pod is deleted five times while
// a pod writes to ext4 and xfs claims; each time the DaemonSet brings it
// back. The writers see no error, and the guest's kernel log shows no
// filesystem or block error.
func testRestart(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	pods, pvcs := c.Clients.CoreV1().Pods("default"), c.Clients.CoreV1().PersistentVolumeClaims("default")
	cases := []volumeCase{{"restart-ext4", "ploop-ext4", "64Mi", false}, {"restart-xfs", "ploop-xfs", "320Mi", false}}
	for _, vc := range cases {
		if _, err := pvcs.Create(ctx, newPVC(vc.name, vc), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p := volumePod("writer-"+vc.name, vc.name, false, restartWriter)
		signalReady(p)
		if _, err := pods.Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	writersOK := func() error {
		for _, vc := range cases {
			p, err := pods.Get(ctx, "writer-"+vc.name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
				t.Fatalf("writer %s ended: %s", p.Name, podReason(p))
			}
			if !podReady(p) {
				return fmt.Errorf("writer %s not writing yet (%s)", p.Name, podReason(p))
			}
		}
		return nil
	}
	waitFor(ctx, t, "the writers to write", writersOK)
	for round := 1; round <= 5; round++ {
		start := time.Now()
		old := nodePlugin(ctx, t, c)
		if err := c.Clients.CoreV1().Pods("kube-system").Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(ctx, t, "the DaemonSet to bring the node plugin back", func() error {
			p := nodePlugin(ctx, t, c)
			if p.UID == old.UID {
				return fmt.Errorf("the old pod %s is still there", p.Name)
			}
			if !podReady(p) {
				return fmt.Errorf("the new pod %s is not Ready (%s)", p.Name, podReason(p))
			}
			return nil
		})
		if err := writersOK(); err != nil {
			t.Fatal(err)
		}
		t.Logf("flow 6: node plugin restart %d: back and Ready in %s", round, time.Since(start).Round(100*time.Millisecond))
	}
	for _, vc := range cases {
		deletePod(ctx, t, c, "writer-"+vc.name)
	}
	for _, vc := range cases {
		if _, err := pods.Create(ctx, volumePod("check-"+vc.name, vc.name, false, pattern+" && "+restartChecker), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, vc := range cases {
		if p := waitPod(ctx, t, c, "check-"+vc.name); p.Status.Phase != corev1.PodSucceeded {
			t.Errorf("%s after the restarts: %s", vc.name, podReason(p))
		} else if out, err := pods.GetLogs(p.Name, &corev1.PodLogOptions{}).DoRaw(ctx); err == nil {
			t.Logf("flow 6: %s: the writer made %s with no error", vc.name, strings.TrimSpace(string(out)))
		}
		deletePodAndClaim(ctx, t, c, "check-"+vc.name, vc.name)
	}
	// The kernel's log of the whole run so far: no filesystem or block
	// layer error. (nbd's own lines about its lost connection are
	// expected: the server goes away with the plugin, and the kernel
	// holds the I/O until the new one is there.)
	dmesg := guestPod("dmesg", `dmesg > /tmp/k; if grep -iE 'EXT4-fs (error|warning)|XFS \(.*\): (.*error|.*corrupt|metadata I/O)|I/O error|blk_update_request|Buffer I/O' /tmp/k; then exit 1; fi`)
	if _, err := pods.Create(ctx, dmesg, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if p := waitPod(ctx, t, c, "dmesg"); p.Status.Phase != corev1.PodSucceeded {
		t.Errorf("the guest's kernel log shows errors:\n%s", podReason(p))
	}
	deletePod(ctx, t, c, "dmesg")
}

// nodePlugin is the node plugin's pod (the one not being deleted).
func nodePlugin(ctx context.Context, t *testing.T, c *Cluster) *corev1.Pod {
	t.Helper()
	l, err := c.Clients.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{LabelSelector: nodePluginSelector})
	if err != nil {
		t.Fatal(err)
	}
	for i := range l.Items {
		if l.Items[i].DeletionTimestamp == nil {
			return &l.Items[i]
		}
	}
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "(none)"}}
}

func podReady(p *corev1.Pod) bool {
	for _, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

// deletePod deletes a pod with a second's grace and waits until it is
// gone.
func deletePod(ctx context.Context, t *testing.T, c *Cluster, name string) {
	t.Helper()
	grace := int64(1)
	pods := c.Clients.CoreV1().Pods("default")
	if err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Error(err)
		return
	}
	waitFor(ctx, t, "pod "+name+" to be deleted", func() error {
		if _, err := pods.Get(ctx, name, metav1.GetOptions{}); err == nil {
			return fmt.Errorf("still there")
		} else if !strings.Contains(err.Error(), "not found") {
			return err
		}
		return nil
	})
}

// guestPod runs script privileged in the node's PID namespace, with the
// storage root at /root, to look at the guest itself.
func guestPod(name, script string) *corev1.Pod {
	priv := true
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever, HostPID: true,
			Containers: []corev1.Container{{Name: "c", Image: ToolsImage, ImagePullPolicy: corev1.PullNever,
				Command: []string{"sh", "-c", script}, SecurityContext: &corev1.SecurityContext{Privileged: &priv},
				TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
				VolumeMounts:             []corev1.VolumeMount{{Name: "root", MountPath: "/root", ReadOnly: true}}}},
			Volumes: []corev1.Volume{{Name: "root", VolumeSource: corev1.VolumeSource{
				HostPath: &corev1.HostPathVolumeSource{Path: StorageRoot}}}},
		},
	}
}

// testCapacity (flow 7): a claim larger than the node's storage root
// (overcommit ratio 1, the chart's default) stays Pending, with an event
// that says why, and nothing of it is made.
func testCapacity(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	pods, pvcs := c.Clients.CoreV1().Pods("default"), c.Clients.CoreV1().PersistentVolumeClaims("default")
	vc := volumeCase{"too-big", "ploop-ext4", "20Gi", false}
	if _, err := pvcs.Create(ctx, newPVC(vc.name, vc), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pods.Create(ctx, volumePod(vc.name, vc.name, false, "true"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var why string
	waitFor(ctx, t, "an event that says why the 20Gi claim cannot be placed", func() error {
		evs, err := c.Clients.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.InvolvedObject.Name != vc.name || e.Type != corev1.EventTypeWarning {
				continue
			}
			if strings.Contains(e.Message, "enough free storage") || strings.Contains(e.Message, "ResourceExhausted") {
				why = e.Reason + ": " + e.Message
				return nil
			}
		}
		return fmt.Errorf("no such event yet")
	})
	t.Logf("flow 7: %s", why)
	pvc, err := pvcs.Get(ctx, vc.name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if pvc.Status.Phase != corev1.ClaimPending || pvc.Spec.VolumeName != "" {
		t.Errorf("the claim is %s, bound to %q; want Pending and unbound", pvc.Status.Phase, pvc.Spec.VolumeName)
	}
	deletePod(ctx, t, c, vc.name)
	if err := pvcs.Delete(ctx, vc.name, metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
}

// cleanupResources are the API's resources that must be empty at the end.
var cleanupResources = []schema.GroupVersionResource{volumeSnapshots, volumeSnapshotContents, ploopVolumes, ploopSnapshots}

// testCleanup (flow 8): with every claim and snapshot deleted, and then
// the release, nothing is left: no PersistentVolumes, snapshot contents
// or PloopVolume/PloopSnapshot CRs in the API; no volume, snapshot or
// attachment under the storage root, no mount of a volume and no
// connected nbd device on the node.
func testCleanup(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dyn := dynamicClient(t, c)
	waitFor(ctx, t, "every PersistentVolume, snapshot content and PloopVolume/PloopSnapshot to be gone", func() error {
		pvs, err := c.Clients.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		var left []string
		for _, pv := range pvs.Items {
			left = append(left, "PersistentVolume "+pv.Name)
		}
		for _, gvr := range cleanupResources {
			l, err := dyn.Resource(gvr).List(ctx, metav1.ListOptions{})
			if err != nil {
				return fmt.Errorf("list %s: %w", gvr.Resource, err)
			}
			for _, o := range l.Items {
				left = append(left, gvr.Resource+" "+o.GetName())
			}
		}
		if len(left) > 0 {
			return fmt.Errorf("left: %s", strings.Join(left, ", "))
		}
		return nil
	})
	helm, err := helmbin.Path(ctx, helmbin.V3, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := c.API.WriteKubeconfig(kc); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(ctx, helm, "uninstall", "ploop-csi", "--namespace", "kube-system", "--kubeconfig", kc, "--wait").CombinedOutput(); err != nil {
		t.Fatalf("helm uninstall: %v\n%s", err, out)
	}
	waitFor(ctx, t, "the release's pods to be gone", func() error {
		l, err := c.Clients.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=ploop-csi"})
		if err != nil {
			return err
		}
		if len(l.Items) > 0 {
			return fmt.Errorf("%d left", len(l.Items))
		}
		return nil
	})
	check := guestPod("leftovers", `fail=0
if grep -E 'kubernetes.io~csi|csi.ploop.io|/var/lib/ploop-csi/.' /proc/1/mountinfo; then echo "mounts left"; fail=1; fi
for d in /sys/block/nbd*; do test -e $d/pid && { echo "$d still connected"; fail=1; }; done
if find /root -name 'ploop-*' -o -name 'simfs-*' -o -name 'snap-*' | grep .; then echo "volumes left"; fail=1; fi
exit $fail`)
	if _, err := c.Clients.CoreV1().Pods("default").Create(ctx, check, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if p := waitPod(ctx, t, c, "leftovers"); p.Status.Phase != corev1.PodSucceeded {
		t.Errorf("the node keeps what the deleted volumes had:\n%s", podReason(p))
	}
	deletePod(ctx, t, c, "leftovers")
}
