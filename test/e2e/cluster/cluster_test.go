package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestCluster brings the cluster up once and drives the user's flows in
// it, in order: pods run at all; the chart installs; PVCs of every kind
// keep their data across pods.
func TestCluster(t *testing.T) {
	if vmtest.InGuest() {
		return
	}
	images := buildImages(t)
	c := Start(t, Options{Images: images})
	t.Run("Pods", func(t *testing.T) { testPods(t, c) })
	if !t.Run("Install", func(t *testing.T) { testInstall(t, c) }) {
		return // the flows below need the driver
	}
	t.Run("Volumes", func(t *testing.T) { testVolumes(t, c) })
}

// buildImages writes the driver's and the sidecars' images for the node to
// import.
func buildImages(t *testing.T) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	dir := t.TempDir()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out := []string{filepath.Join(dir, "ploop-csi.tar")}
	if err := WriteDriverImage(ctx, root, out[0], t.Logf); err != nil {
		t.Fatal(err)
	}
	for _, s := range Sidecars {
		p := filepath.Join(dir, s.Name+".tar")
		if err := s.WriteImage(ctx, p, t.Logf); err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	t.Logf("cluster: images built in %s", time.Since(start).Round(100*time.Millisecond))
	return out
}

// testPods runs pods through the scheduler and the kubelet: one on the
// guest's pod bridge, one on the node's network.
func testPods(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	n, err := c.Clients.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if v := n.Status.NodeInfo.KubeletVersion; v != kubeapi.KubernetesVersion {
		t.Errorf("kubelet version %q, want %q", v, kubeapi.KubernetesVersion)
	}
	for _, hostNet := range []bool{false, true} {
		name := fmt.Sprintf("hello-hostnet-%t", hostNet)
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec: corev1.PodSpec{
				RestartPolicy: corev1.RestartPolicyNever, HostNetwork: hostNet,
				Containers: []corev1.Container{{Name: "c", Image: ToolsImage, ImagePullPolicy: corev1.PullNever,
					Command: []string{"sh", "-c", "echo hello from $(cat /proc/sys/kernel/hostname); test -r /var/run/secrets/kubernetes.io/serviceaccount/token"}}},
			},
		}
		if _, err := c.Clients.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, hostNet := range []bool{false, true} {
		name := fmt.Sprintf("hello-hostnet-%t", hostNet)
		p := waitPod(ctx, t, c, name)
		if p.Status.Phase != corev1.PodSucceeded {
			t.Errorf("pod %s: %s (%s)", name, p.Status.Phase, podReason(p))
		}
		if !hostNet && !strings.HasPrefix(p.Status.PodIP, "10.244.0.") {
			t.Errorf("pod %s has address %q, want one of %s", name, p.Status.PodIP, PodSubnet)
		}
	}
}

func waitPod(ctx context.Context, t *testing.T, c *Cluster, name string) *corev1.Pod {
	t.Helper()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		p, err := c.Clients.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err == nil && (p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed) {
			return p
		}
		select {
		case <-ctx.Done():
			if p != nil {
				t.Fatalf("pod %s: %v (%s, %s)", name, ctx.Err(), p.Status.Phase, podReason(p))
			}
			t.Fatalf("pod %s: %v (%v)", name, ctx.Err(), err)
		case <-tick.C:
		}
	}
}

func podReason(p *corev1.Pod) string {
	var r []string
	for _, cs := range p.Status.ContainerStatuses {
		switch {
		case cs.State.Waiting != nil:
			r = append(r, cs.Name+" waiting: "+cs.State.Waiting.Reason+" "+cs.State.Waiting.Message)
		case cs.State.Terminated != nil:
			r = append(r, fmt.Sprintf("%s exited %d: %s", cs.Name, cs.State.Terminated.ExitCode, cs.State.Terminated.Reason))
		}
	}
	for _, cond := range p.Status.Conditions {
		if cond.Status != corev1.ConditionTrue && cond.Message != "" {
			r = append(r, string(cond.Type)+": "+cond.Message)
		}
	}
	return strings.Join(r, "; ")
}
