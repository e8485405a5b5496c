package cluster

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestCluster brings the cluster up once and drives the user's flows in
// it, in order: pods run at all; the chart installs (1); PVCs of every
// kind keep their data across pods (2); snapshots and clones of a claim
// under a writer (3); online expansion (4); quota for a non-root pod
// (5); node plugin restarts under writers (6); the Kubernetes external
// storage suite (9, a subset unless make e2e-full); a claim beyond the
// capacity (7); nothing left after the claims and the release are
// deleted (8).
//
// It first builds or finds in the cache everything the cluster needs,
// then runs itself again in a network namespace of its own that has only
// lo: the proof that no process of the cluster sends traffic anywhere but
// the host's loopback (every other address fails at once there).
func TestCluster(t *testing.T) {
	if vmtest.InGuest() {
		return
	}
	if os.Getenv(isolatedEnv) == "" {
		runIsolated(t)
		return
	}
	checkIsolated(t)
	c := Start(t, Options{Images: filepath.SplitList(os.Getenv(imagesEnv))})
	t.Run("Pods", func(t *testing.T) { testPods(t, c) })
	if !t.Run("Install", func(t *testing.T) { testInstall(t, c) }) {
		return // the flows below need the driver
	}
	t.Run("Volumes", func(t *testing.T) { testVolumes(t, c) })
	t.Run("Snapshot", func(t *testing.T) { testSnapshot(t, c) })
	t.Run("Expand", func(t *testing.T) { testExpand(t, c) })
	t.Run("Quota", func(t *testing.T) { testQuota(t, c) })
	t.Run("Restart", func(t *testing.T) { testRestart(t, c) })
	t.Run("External", func(t *testing.T) { testExternal(t, c) })
	t.Run("Capacity", func(t *testing.T) { testCapacity(t, c) })
	t.Run("Cleanup", func(t *testing.T) { testCleanup(t, c) })
}

// The isolated run's environment: set, it is the run in the namespace;
// the images built for it.
const (
	isolatedEnv = "PLOOP_CSI_CLUSTER_ISOLATED"
	imagesEnv   = "PLOOP_CSI_CLUSTER_IMAGES"
)

// runIsolated warms the caches (the network is needed for that alone),
// then runs TestCluster again as a child in a new network namespace,
// passing its output through.
func runIsolated(t *testing.T) {
	if why := vmtest.SkipReason(); why != "" {
		t.Skip(why)
	}
	if os.Geteuid() != 0 {
		t.Fatal("the cluster runs as root: it makes a network namespace, and the node's VM mounts")
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	if err := Warm(ctx, t.Logf); err != nil {
		t.Fatal(err)
	}
	images := buildImages(t)
	t.Logf("cluster: binaries, images and VM files ready in %s", time.Since(start).Round(100*time.Millisecond))
	deadline, ok := t.Deadline()
	if !ok {
		deadline = time.Now().Add(40 * time.Minute)
	}
	rctx, rcancel := context.WithDeadline(context.Background(), deadline.Add(-30*time.Second))
	defer rcancel()
	// The child runs the flows the parent was asked for
	// (-run 'TestCluster/(Install|External)' runs only those).
	run := "^TestCluster$"
	if f := flag.Lookup("test.run"); f != nil && strings.Contains(f.Value.String(), "TestCluster/") {
		run = f.Value.String()
	}
	cmd := exec.CommandContext(rctx, os.Args[0], "-test.run="+run, "-test.v",
		"-test.timeout="+time.Until(deadline.Add(-time.Minute)).Round(time.Second).String())
	cmd.Env = append(os.Environ(), isolatedEnv+"=1", imagesEnv+"="+strings.Join(images, string(os.PathListSeparator)))
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	// The child's own VM and processes end when it does; a kill of the
	// child (the deadline) must reach them too.
	cmd.SysProcAttr.Setpgid = true
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		t.Log(sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the cluster's run in its own network namespace failed (%v); its output is above", err)
	}
}

// checkIsolated makes sure the run is in a namespace whose only interface
// is lo, and brings lo up.
func checkIsolated(t *testing.T) {
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifs {
		if i.Name != "lo" {
			t.Fatalf("the cluster's network namespace has interface %s besides lo", i.Name)
		}
	}
	if err := linkUp("lo"); err != nil {
		t.Fatal(err)
	}
	t.Logf("cluster: running in a network namespace whose only interface is lo")
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
	e2e, err := buildE2EImages(ctx, dir, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	out = append(out, e2e...)
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
		// The API server reaches the kubelet (through the egress proxy
		// and the VM's forward) for the pod's log.
		logs, err := c.Clients.CoreV1().Pods("default").GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctx)
		if err != nil || !strings.Contains(string(logs), "hello from") {
			t.Errorf("log of pod %s through the API server: %q, %v", name, logs, err)
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
			r = append(r, fmt.Sprintf("%s exited %d: %s %s", cs.Name, cs.State.Terminated.ExitCode, cs.State.Terminated.Reason,
				strings.TrimSpace(cs.State.Terminated.Message)))
		}
	}
	for _, cond := range p.Status.Conditions {
		if cond.Status != corev1.ConditionTrue && cond.Message != "" {
			r = append(r, string(cond.Type)+": "+cond.Message)
		}
	}
	return strings.Join(r, "; ")
}
