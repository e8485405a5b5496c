package orphans_test

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/orphans"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

const driverName = "csi.ploop.io"

// TestScan against a real API server: a volume that a PersistentVolume
// uses is left alone; a ready volume without one and a PersistentVolume
// without a volume are reported with Events and the gauge; a volume of
// another driver's PersistentVolume, a young volume and a pending one are
// not orphans; with Delete the orphaned volume goes, the PV never.
func TestScan(t *testing.T) {
	srv := kubeapi.StartT(t, kubeapi.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := srv.InstallCRDs(ctx, filepath.Join("..", "..", "charts", "ploop-csi", "crds", "*.yaml")); err != nil {
		t.Fatal(err)
	}
	c, scheme, err := srv.Client(v1alpha1.AddToScheme)
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(srv.Config())
	bc := record.NewBroadcaster()
	bc.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: cs.CoreV1().Events("")})
	defer bc.Shutdown()
	rec := bc.NewRecorder(scheme, corev1.EventSource{Component: "ploop-csi-controller"})

	volume := func(phase v1alpha1.Phase) string {
		id := catalog.NewVolumeID(catalog.Ploop)
		v := &v1alpha1.PloopVolume{ObjectMeta: metav1.ObjectMeta{Name: id, Labels: map[string]string{v1alpha1.NodeLabel: "node-a"}},
			Spec: v1alpha1.PloopVolumeSpec{Name: "pvc-" + id[6:14], NodeName: "node-a", Type: "ploop", Size: resource.MustParse("1Gi")}}
		if err := c.Create(ctx, v); err != nil {
			t.Fatal(err)
		}
		if phase != "" {
			v.Status = v1alpha1.PloopVolumeStatus{Phase: phase, VolumeID: id, ObservedGeneration: v.Generation}
			if err := c.Status().Update(ctx, v); err != nil {
				t.Fatal(err)
			}
		}
		return id
	}
	pv := func(name, driver, handle string) {
		p := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.PersistentVolumeSpec{
			Capacity:               corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes:            []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: driver, VolumeHandle: handle}},
		}}
		if err := c.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}); err != nil {
		t.Fatal(err)
	}
	used, orphan, pending := volume(v1alpha1.Ready), volume(v1alpha1.Ready), volume("")
	// A snapshot on a node that is gone for good.
	gone := &v1alpha1.PloopSnapshot{ObjectMeta: metav1.ObjectMeta{Name: catalog.NewSnapshotID()},
		Spec: v1alpha1.PloopSnapshotSpec{Name: "snap-gone", NodeName: "node-gone", SourceVolume: used}}
	if err := c.Create(ctx, gone); err != nil {
		t.Fatal(err)
	}
	pv("pv-used", driverName, used)
	pv("pv-dangling", driverName, catalog.NewVolumeID(catalog.Ploop))
	pv("pv-other-driver", "other.csi.example", orphan) // not ours: does not count as a use

	reg := prometheus.NewPedanticRegistry()
	r, err := orphans.New(orphans.Options{Driver: driverName, Reader: c, Writer: c, Recorder: rec, Registerer: reg, Grace: orphans.NoGrace})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := r.Scan(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Volumes, []string{orphan}) || !slices.Equal(rep.PersistentVolumes, []string{"pv-dangling"}) || len(rep.Deleted) != 0 ||
		!slices.Equal(rep.Stranded, []string{gone.Name}) {
		t.Fatalf("report %+v, want volume %s, pv-dangling and stranded %s (pending %s and used %s left alone)", rep, orphan, gone.Name, pending, used)
	}
	waitEvent(ctx, t, cs, gone.Name, "NodeGone")
	want := map[string]float64{"volume": 1, "persistentvolume": 1, "stranded": 1}
	for kind, n := range want {
		if got := testutil.ToFloat64(gaugeOf(t, reg, kind)); got != n {
			t.Errorf("ploop_csi_orphans{kind=%s} = %v, want %v", kind, got, n)
		}
	}
	for _, name := range []string{orphan, "pv-dangling"} {
		waitEvent(ctx, t, cs, name, "Orphan")
	}

	// A young volume is not an orphan yet: its PersistentVolume may be on
	// its way.
	r2, err := orphans.New(orphans.Options{Driver: driverName, Reader: c, Writer: c, Grace: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := r2.Scan(ctx); err != nil || len(rep.Volumes) != 0 {
		t.Errorf("with a grace of an hour: %+v, %v", rep, err)
	}

	// --delete-orphans: the orphaned volume goes, nothing else.
	r.Unregister()
	rd, err := orphans.New(orphans.Options{Driver: driverName, Reader: c, Writer: c, Recorder: rec, Registerer: reg, Grace: orphans.NoGrace, Delete: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := rd.Scan(ctx); err != nil || !slices.Equal(rep.Deleted, []string{orphan}) {
		t.Fatalf("delete scan: %+v, %v", rep, err)
	}
	if err := c.Get(ctx, client.ObjectKey{Name: orphan}, &v1alpha1.PloopVolume{}); !apierrors.IsNotFound(err) {
		t.Errorf("the orphan is still there: %v", err)
	}
	for _, name := range []string{used, pending} {
		if err := c.Get(ctx, client.ObjectKey{Name: name}, &v1alpha1.PloopVolume{}); err != nil {
			t.Errorf("volume %s: %v", name, err)
		}
	}
	if err := c.Get(ctx, client.ObjectKey{Name: "pv-dangling"}, &corev1.PersistentVolume{}); err != nil {
		t.Errorf("a PersistentVolume was touched: %v", err)
	}

	// A shared root: volumes have no node; one is recorded as served by
	// a node that is gone, which blocks it; an orphan is deleted through
	// the controller's catalogue (DeleteVolume), not by deleting its
	// resource.
	rd.Unregister()
	shared := func(attached string) string {
		id := catalog.NewVolumeID(catalog.Ploop)
		v := &v1alpha1.PloopVolume{ObjectMeta: metav1.ObjectMeta{Name: id},
			Spec: v1alpha1.PloopVolumeSpec{Name: "pvc-" + id[6:14], Type: "ploop", Size: resource.MustParse("1Gi")}}
		if err := c.Create(ctx, v); err != nil {
			t.Fatal(err)
		}
		v.Status = v1alpha1.PloopVolumeStatus{Phase: v1alpha1.Ready, VolumeID: id, AttachedNode: attached, ObservedGeneration: v.Generation}
		if err := c.Status().Update(ctx, v); err != nil {
			t.Fatal(err)
		}
		return id
	}
	blocked, sharedOrphan := shared("node-gone"), shared("")
	pv("pv-blocked", driverName, blocked)
	var deleted []string
	rs, err := orphans.New(orphans.Options{Driver: driverName, Reader: c, Writer: c, Recorder: rec, Registerer: reg, Grace: orphans.NoGrace,
		Delete: true, DeleteVolume: func(ctx context.Context, id string) error { deleted = append(deleted, id); return nil }})
	if err != nil {
		t.Fatal(err)
	}
	rep, err = rs.Scan(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(deleted, []string{sharedOrphan}) || !slices.Contains(rep.Stranded, blocked) {
		t.Errorf("shared root: deleted %v, report %+v; want %s deleted through the catalogue and %s stranded", deleted, rep, sharedOrphan, blocked)
	}
	waitEvent(ctx, t, cs, blocked, "NodeGone")
}

func gaugeOf(t *testing.T, reg *prometheus.Registry, kind string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			for _, l := range m.Label {
				if mf.GetName() == "ploop_csi_orphans" && l.GetName() == "kind" && l.GetValue() == kind {
					g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
					g.Set(m.GetGauge().GetValue())
					return g
				}
			}
		}
	}
	t.Fatalf("no ploop_csi_orphans{kind=%q}", kind)
	return nil
}

func waitEvent(ctx context.Context, t *testing.T, cs *kubernetes.Clientset, object, reason string) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		evs, err := cs.CoreV1().Events("").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + object})
		if err == nil && len(evs.Items) > 0 && evs.Items[0].Reason == reason {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no %s event on %s: %v", reason, object, err)
		case <-tick.C:
		}
	}
}
