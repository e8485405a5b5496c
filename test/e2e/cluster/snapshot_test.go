package cluster

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

var (
	volumeSnapshots        = schema.GroupVersionResource{Group: "snapshot.storage.k8s.io", Version: "v1", Resource: "volumesnapshots"}
	volumeSnapshotContents = schema.GroupVersionResource{Group: "snapshot.storage.k8s.io", Version: "v1", Resource: "volumesnapshotcontents"}
	ploopVolumes           = schema.GroupVersionResource{Group: "ploop.io", Version: "v1alpha1", Resource: "ploopvolumes"}
	ploopSnapshots         = schema.GroupVersionResource{Group: "ploop.io", Version: "v1alpha1", Resource: "ploopsnapshots"}
)

// The writer of flow 3 appends numbered records to a log and syncs after
// each; once $N records are flushed it reports Ready and goes on writing.
// A copy taken later must hold at least $N records, numbered from 1 with
// no gap; only the last line may be cut short (written, never flushed).
const (
	snapWriter = `i=1; while :; do
echo "record $i" >> /data/log || exit 1; sync || exit 1
test $i -eq $N && touch /tmp/www/ready
i=$((i+1)); done`
	snapReader = `n=0; bad=0
while read -r a b; do
	test "$bad" = 1 && { echo "record $n is damaged and not the last"; exit 1; }
	if test "$a $b" = "record $((n+1))"; then n=$((n+1)); else bad=1; fi
done < /data/log
echo "$n whole records"; test $n -ge $N`
	snapRecords = 200
)

// testSnapshot (flow 3): a VolumeSnapshot of a claim a running pod is
// writing to, restored into a new claim, holds everything the pod had
// flushed before the snapshot was asked for; a clone of the live claim
// (a claim whose data source is the claim) does too.
func testSnapshot(t *testing.T, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dyn := dynamicClient(t, c)
	pods, pvcs := c.Clients.CoreV1().Pods("default"), c.Clients.CoreV1().PersistentVolumeClaims("default")
	src := volumeCase{"snap-src", "ploop-ext4", "64Mi", false}
	if _, err := pvcs.Create(ctx, newPVC("snap-src", src), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	writer := volumePod("snap-writer", "snap-src", false, fmt.Sprintf("N=%d; %s", snapRecords, snapWriter))
	signalReady(writer)
	if _, err := pods.Create(ctx, writer, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, fmt.Sprintf("the writer to flush %d records", snapRecords), func() error {
		p := waitPodRunning(ctx, t, c, "snap-writer")
		for _, cs := range p.Status.ContainerStatuses {
			if cs.Ready {
				return nil
			}
		}
		return fmt.Errorf("not Ready")
	})

	// The writer goes on writing while the snapshot and the clone are taken.
	start := time.Now()
	snap := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
		"metadata": map[string]any{"name": "snap-1", "namespace": "default"},
		"spec": map[string]any{"volumeSnapshotClassName": "ploop-csi",
			"source": map[string]any{"persistentVolumeClaimName": "snap-src"}},
	}}
	if _, err := dyn.Resource(volumeSnapshots).Namespace("default").Create(ctx, snap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	clone := newPVC("snap-clone", src)
	clone.Spec.DataSource = &corev1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: "snap-src"}
	if _, err := pvcs.Create(ctx, clone, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "VolumeSnapshot snap-1 to be ready", func() error {
		s, err := dyn.Resource(volumeSnapshots).Namespace("default").Get(ctx, "snap-1", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ready, _, _ := unstructured.NestedBool(s.Object, "status", "readyToUse"); !ready {
			msg, _, _ := unstructured.NestedString(s.Object, "status", "error", "message")
			return fmt.Errorf("not ready to use (%s)", msg)
		}
		return nil
	})
	t.Logf("flow 3: snapshot of a claim under a writer ready in %s", time.Since(start).Round(100*time.Millisecond))

	restored := newPVC("snap-restored", src)
	apiGroup := "snapshot.storage.k8s.io"
	restored.Spec.DataSource = &corev1.TypedLocalObjectReference{APIGroup: &apiGroup, Kind: "VolumeSnapshot", Name: "snap-1"}
	if _, err := pvcs.Create(ctx, restored, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	script := fmt.Sprintf("N=%d; %s", snapRecords, snapReader)
	for _, claim := range []string{"snap-restored", "snap-clone"} {
		if _, err := pods.Create(ctx, volumePod("read-"+claim, claim, false, script), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, claim := range []string{"snap-restored", "snap-clone"} {
		p := waitPod(ctx, t, c, "read-"+claim)
		if p.Status.Phase != corev1.PodSucceeded {
			t.Errorf("the copy %s lacks records the writer had flushed before it was taken: %s (%s)", claim, p.Status.Phase, podReason(p))
		}
	}
	if p, err := pods.Get(ctx, "snap-writer", metav1.GetOptions{}); err != nil || p.Status.Phase != corev1.PodRunning {
		t.Errorf("the writer did not keep running through the snapshot and the clone: %v %s", err, podReason(p))
	}
	for _, claim := range []string{"snap-restored", "snap-clone"} {
		deletePodAndClaim(ctx, t, c, "read-"+claim, claim)
	}
	deletePodAndClaim(ctx, t, c, "snap-writer", "snap-src")
	if err := dyn.Resource(volumeSnapshots).Namespace("default").Delete(ctx, "snap-1", metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
	waitFor(ctx, t, "the snapshot's content to be deleted", func() error {
		l, err := dyn.Resource(volumeSnapshotContents).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(l.Items) > 0 {
			return fmt.Errorf("%d VolumeSnapshotContents left", len(l.Items))
		}
		if _, err := dyn.Resource(volumeSnapshots).Namespace("default").Get(ctx, "snap-1", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			return fmt.Errorf("snap-1 still exists (%v)", err)
		}
		return nil
	})
}

func dynamicClient(t *testing.T, c *Cluster) *dynamic.DynamicClient {
	t.Helper()
	dyn, err := dynamic.NewForConfig(c.API.Config())
	if err != nil {
		t.Fatal(err)
	}
	return dyn
}
