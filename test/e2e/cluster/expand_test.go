package cluster

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// expandCase is one claim of flow 4: its size before and after.
type expandCase struct {
	volumeCase
	to string
}

var expandCases = []expandCase{
	{volumeCase{"ext4", "ploop-ext4", "64Mi", false}, "160Mi"},
	{volumeCase{"xfs", "ploop-xfs", "320Mi", false}, "480Mi"},
	{volumeCase{"block", "ploop-ext4", "64Mi", true}, "160Mi"},
}

// The expansion pods wait for the growth, then use the new space past the
// old end (a file larger than the old filesystem; a pattern on the device
// beyond its old size, read back), and only then report Ready. Any failure
// ends the pod, which never restarts.
const (
	// $WANT: KiB the filesystem's size must reach; $FILL: MiB to write.
	expandFS = `size() { df -k /data | tail -1 | tr -s ' ' | cut -d' ' -f2; }
echo "start $(size) KiB"
until test "$(size)" -ge $WANT; do sleep 1; done
echo "grown to $(size) KiB"
dd if=/dev/zero of=/data/fill bs=1048576 count=$FILL conv=fsync || exit 1
rm /data/fill && touch /tmp/www/ready && exec sleep 2147483647`
	// $WANT: bytes the device must reach; $SEEK: MiB past the old end.
	expandDev = pattern + ` && echo "start $(blockdev --getsize64 /dev/vol) bytes"
until test "$(blockdev --getsize64 /dev/vol)" -ge $WANT; do sleep 1; done
echo "grown to $(blockdev --getsize64 /dev/vol) bytes"
dd if=/tmp/p of=/dev/vol bs=1048576 seek=$SEEK count=1 conv=fsync || exit 1
dd if=/dev/vol bs=1048576 skip=$SEEK count=1 | cmp - /tmp/p || exit 1
touch /tmp/www/ready && exec sleep 2147483647`
)

// testExpand (flow 4): a running pod's mounted ext4 and xfs claims and its
// Block claim are expanded; the pod sees the new size without a restart
// and uses the space past the old end.
func testExpand(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	pods, pvcs := c.Clients.CoreV1().Pods("default"), c.Clients.CoreV1().PersistentVolumeClaims("default")
	for _, ec := range expandCases {
		name := "expand-" + ec.name
		if _, err := pvcs.Create(ctx, newPVC(name, ec.volumeCase), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		from, to := resource.MustParse(ec.size), resource.MustParse(ec.to)
		var script string
		if ec.block {
			script = fmt.Sprintf("WANT=%d SEEK=%d; %s", to.Value(), from.Value()>>20+8, expandDev)
		} else {
			// At least half the growth must show: the filesystems keep
			// some of it for their own metadata.
			want := (from.Value() + (to.Value()-from.Value())/2) >> 10
			script = fmt.Sprintf("WANT=%d FILL=%d; %s", want, from.Value()>>20+8, expandFS)
		}
		pod := volumePod(name, name, ec.block, script)
		signalReady(pod)
		if _, err := pods.Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	uids := map[string]types.UID{}
	for _, ec := range expandCases {
		p := waitPodRunning(ctx, t, c, "expand-"+ec.name)
		uids[ec.name] = p.UID
	}
	start := time.Now()
	for _, ec := range expandCases {
		patch := fmt.Sprintf(`{"spec":{"resources":{"requests":{"storage":%q}}}}`, ec.to)
		if _, err := pvcs.Patch(ctx, "expand-"+ec.name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ec := range expandCases {
		name := "expand-" + ec.name
		to := resource.MustParse(ec.to)
		waitFor(ctx, t, name+" to report "+ec.to+" and its pod to see it", func() error {
			pvc, err := pvcs.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if got := pvc.Status.Capacity[corev1.ResourceStorage]; got.Cmp(to) < 0 {
				return fmt.Errorf("claim capacity %s (conditions %v)", got.String(), pvc.Status.Conditions)
			}
			p, err := pods.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if p.UID != uids[ec.name] {
				t.Fatalf("pod %s was replaced", name)
			}
			if p.Status.Phase != corev1.PodRunning {
				t.Fatalf("pod %s: %s (%s)", name, p.Status.Phase, podReason(p))
			}
			for _, cs := range p.Status.ContainerStatuses {
				if cs.RestartCount != 0 {
					t.Fatalf("pod %s: its container restarted", name)
				}
				if !cs.Ready {
					return fmt.Errorf("pod %s does not see the new size yet", name)
				}
			}
			return nil
		})
		t.Logf("flow 4: %s (%s) grew from %s to %s online, %s after the request", name, ec.class, ec.size, ec.to,
			time.Since(start).Round(100*time.Millisecond))
	}
	for _, ec := range expandCases {
		deletePodAndClaim(ctx, t, c, "expand-"+ec.name, "expand-"+ec.name)
	}
}

// waitPodRunning waits until the pod runs; a pod that ends fails the test.
func waitPodRunning(ctx context.Context, t *testing.T, c *Cluster, name string) *corev1.Pod {
	t.Helper()
	var p *corev1.Pod
	waitFor(ctx, t, "pod "+name+" to run", func() error {
		var err error
		if p, err = c.Clients.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{}); err != nil {
			return err
		}
		switch p.Status.Phase {
		case corev1.PodRunning:
			return nil
		case corev1.PodSucceeded, corev1.PodFailed:
			t.Fatalf("pod %s ended: %s (%s)", name, p.Status.Phase, podReason(p))
		}
		return fmt.Errorf("%s (%s)", p.Status.Phase, podReason(p))
	})
	return p
}

// deletePodAndClaim deletes a pod (with a second's grace: the pods sleep
// as their PID 1, which ignores SIGTERM) and its claim, whose protection
// keeps it until the pod is gone.
func deletePodAndClaim(ctx context.Context, t *testing.T, c *Cluster, pod, claim string) {
	t.Helper()
	grace := int64(1)
	if err := c.Clients.CoreV1().Pods("default").Delete(ctx, pod, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Error(err)
	}
	if err := c.Clients.CoreV1().PersistentVolumeClaims("default").Delete(ctx, claim, metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
}
