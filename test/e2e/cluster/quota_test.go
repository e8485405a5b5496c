package cluster

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The quota pod writes twice its claim's size as an unprivileged user;
// the write must stop with EDQUOT or ENOSPC, and the pod reports Ready.
const quotaWriter = `id
dd if=/dev/zero of=/data/big bs=1048576 count=$((2*MIB)) 2>/tmp/err; rc=$?; cat /tmp/err
test $rc -ne 0 || { echo "wrote $((2*MIB)) MiB past a $MIB MiB quota"; exit 1; }
grep -qiE 'quota|no space' /tmp/err || exit 1
touch /tmp/www/ready && exec sleep 2147483647`

// testQuota (flow 5): a pod running as user 1000 with an fsGroup writes
// past its simfs claim's size and gets EDQUOT or ENOSPC; the kubelet's
// volume metrics (from NodeGetVolumeStats) show the limit as the claim's
// capacity, and the usage at it.
func testQuota(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	vc := volumeCase{"quota-simfs", "simfs", "16Mi", false}
	if _, err := c.Clients.CoreV1().PersistentVolumeClaims("default").Create(ctx, newPVC(vc.name, vc), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	size := resource.MustParse(vc.size)
	p := volumePod(vc.name, vc.name, false, fmt.Sprintf("MIB=%d; %s", size.Value()>>20, quotaWriter))
	user := int64(1000)
	p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsUser: &user, RunAsGroup: &user, FSGroup: &user}
	signalReady(p)
	if _, err := c.Clients.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the unprivileged writer to hit the quota", func() error {
		p := waitPodRunning(ctx, t, c, vc.name)
		if !podReady(p) {
			return fmt.Errorf("not there yet (%s)", podReason(p))
		}
		return nil
	})
	logs, err := c.Clients.CoreV1().Pods("default").GetLogs(vc.name, &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("flow 5: the writer's output: %s", strings.TrimSpace(string(logs)))
	var capacity, used float64
	waitFor(ctx, t, "the kubelet's metrics of "+vc.name, func() error {
		m, err := c.Clients.CoreV1().RESTClient().Get().AbsPath("/api/v1/nodes", c.NodeName, "proxy", "metrics").DoRaw(ctx)
		if err != nil {
			return err
		}
		var ok1, ok2 bool
		capacity, ok1 = claimMetric(string(m), "kubelet_volume_stats_capacity_bytes", vc.name)
		used, ok2 = claimMetric(string(m), "kubelet_volume_stats_used_bytes", vc.name)
		if !ok1 || !ok2 {
			return fmt.Errorf("no volume stats of the claim yet")
		}
		if used < float64(size.Value())*0.9 {
			return fmt.Errorf("usage %.0f, not yet near the limit", used)
		}
		return nil
	})
	if capacity != float64(size.Value()) {
		t.Errorf("kubelet_volume_stats_capacity_bytes of %s is %.0f, want the quota %d", vc.name, capacity, size.Value())
	}
	t.Logf("flow 5: the claim's metrics: capacity %.0f bytes, used %.0f", capacity, used)
	deletePodAndClaim(ctx, t, c, vc.name, vc.name)
}

// claimMetric finds a sample of the Prometheus text metric name labelled
// with the claim.
func claimMetric(text, name, claim string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, `persistentvolumeclaim="`+claim+`"`) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		return v, err == nil
	}
	return 0, false
}
