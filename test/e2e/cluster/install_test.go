package cluster

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ploop-csi/ploop-csi/test/e2e/helmbin"
)

// e2eValues are the chart values of this cluster (documented as the chart's
// e2e combination): no registrar or livenessprobe image, pods on the
// node's network, the API server through the VM's forward.
var e2eValues = []string{"node.registration=builtin", "livenessProbeSidecar=false", "hostNetwork=true",
	"kubernetesAPI.host=" + APIIP, fmt.Sprintf("kubernetesAPI.port=%d", APIPort), "controller.healthPort=9811", "controller.replicas=1"}

// testInstall: helm install of the chart, with the images the node
// imported; the driver is registered with the kubelet (CSINode), and the
// provisioner publishes the node's capacity (CSIStorageCapacity).
func testInstall(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	helm, err := helmbin.Path(ctx, helmbin.V3, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := c.API.WriteKubeconfig(kc); err != nil {
		t.Fatal(err)
	}
	args := []string{"install", "ploop-csi", filepath.Join(root, "charts", "ploop-csi"), "--namespace", "kube-system", "--kubeconfig", kc}
	values := append(slices.Clone(e2eValues), ImageValues()...)
	// The guest's kernel modules are in its initramfs (nbd is loaded
	// already); the host root it shares may have no /lib/modules at all.
	values = append(values, "node.kernelModulesDir="+c.ModulesDir())
	for _, v := range values {
		args = append(args, "--set", v)
	}
	start := time.Now()
	if out, err := exec.CommandContext(ctx, helm, args...).CombinedOutput(); err != nil {
		t.Fatalf("helm install: %v\n%s", err, out)
	}
	cs := c.Clients
	waitFor(ctx, t, "the CSIDriver, the driver on the node's CSINode, and a CSIStorageCapacity", func() error {
		if _, err := cs.StorageV1().CSIDrivers().Get(ctx, "csi.ploop.io", metav1.GetOptions{}); err != nil {
			return err
		}
		n, err := cs.StorageV1().CSINodes().Get(ctx, c.NodeName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("CSINode: %w; %s", err, podsState(ctx, c))
		}
		if !slices.ContainsFunc(n.Spec.Drivers, func(d storagev1.CSINodeDriver) bool { return d.Name == "csi.ploop.io" }) {
			return fmt.Errorf("CSINode %s lists no csi.ploop.io; %s", c.NodeName, podsState(ctx, c))
		}
		caps, err := cs.StorageV1().CSIStorageCapacities("kube-system").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(caps.Items) == 0 {
			return fmt.Errorf("no CSIStorageCapacity yet; %s", podsState(ctx, c))
		}
		return nil
	})
	t.Logf("cluster: chart installed and registered in %s", time.Since(start).Round(100*time.Millisecond))
}

// podsState says where the chart's pods are, for a failure message.
func podsState(ctx context.Context, c *Cluster) string {
	pods, err := c.Clients.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var s []string
	for i := range pods.Items {
		p := &pods.Items[i]
		st := string(p.Status.Phase)
		if r := podReason(p); r != "" {
			st += " (" + r + ")"
		}
		ready := false
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
				ready = true
			}
		}
		s = append(s, fmt.Sprintf("%s: %s ready=%v", p.Name, st, ready))
	}
	return "pods: " + strings.Join(s, "; ")
}

func waitFor(ctx context.Context, t *testing.T, what string, f func() error) {
	t.Helper()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var last error
	for {
		if last = f(); last == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v (last: %v)", what, ctx.Err(), last)
		case <-tick.C:
		}
	}
}
