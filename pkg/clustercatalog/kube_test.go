package clustercatalog_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/clustercatalog"
	"github.com/ploop-csi/ploop-csi/pkg/nodeagent"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

// node is one node of the test cluster: a storage root with its own
// catalogue and a node agent reconciling that node's resources.
type node struct {
	name string
	cat  *catalog.Catalog
}

// cluster is a real API server with the CRDs, two nodes running their
// agents, and the controller's catalogue over a direct client.
type cluster struct {
	c      client.Client
	cc     *clustercatalog.Catalog
	nodes  map[string]*node
	scheme *runtime.Scheme
}

func newCluster(t *testing.T, names ...string) *cluster {
	t.Helper()
	srv := kubeapi.StartT(t, kubeapi.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := srv.InstallCRDs(ctx, filepath.Join("..", "..", "charts", "ploop-csi", "crds", "*.yaml")); err != nil {
		t.Fatal(err)
	}
	c, scheme, err := srv.Client(v1alpha1.AddToScheme)
	if err != nil {
		t.Fatal(err)
	}
	cl := &cluster{c: c, cc: clustercatalog.New(c, clustercatalog.Options{Poll: 20 * time.Millisecond}), nodes: map[string]*node{}, scheme: scheme}
	for _, name := range names {
		cat, err := catalog.Open(t.TempDir(), catalog.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cat.Close() })
		mgr := nodeManager(t, srv, scheme, name, nodeagent.CacheOptions(name))
		if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
			t.Fatal(err)
		}
		// Only operations publish the capacity again within a test.
		if err := nodeagent.Setup(mgr, nodeagent.Options{NodeName: name, Catalog: cat, CapacityInterval: time.Hour,
			Recorder: mgr.GetEventRecorderFor("ploop-csi-node")}); err != nil {
			t.Fatal(err)
		}
		startManager(t, mgr, name)
		cl.nodes[name] = &node{name: name, cat: cat}
	}
	return cl
}

// nodeManager is a node plugin's manager, its cache made with cache.
func nodeManager(t *testing.T, srv *kubeapi.Server, scheme *runtime.Scheme, name string, cache cache.Options) ctrl.Manager {
	t.Helper()
	mgr, err := ctrl.NewManager(srv.Config(), ctrl.Options{
		Scheme: scheme, Cache: cache,
		Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0",
		Logger: ctrl.Log.WithName(name),
		// Two nodes' agents in one test process register the same
		// controller names; a node plugin has one of each.
		Controller: config.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	return mgr
}

// startManager runs mgr until the test ends.
func startManager(t *testing.T, mgr ctrl.Manager, name string) {
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("manager of %s: %v", name, err)
		}
	})
}

func tctx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func wantClass(t *testing.T, err, class error, what string) {
	t.Helper()
	if !errors.Is(err, class) {
		t.Fatalf("%s: %v, want an error of class %v", what, err, class)
	}
}

// TestControllerThroughNodes drives the controller's catalogue against
// node agents on a real API server: every operation lands on the storage
// root of the node that owns the volume, and nowhere else.
func TestControllerThroughNodes(t *testing.T) {
	cl := newCluster(t, "node-a", "node-b")
	a, b := cl.nodes["node-a"], cl.nodes["node-b"]
	ctx := tctx(t, 3*time.Minute)

	v, err := cl.cc.CreateVolumeOn(ctx, "node-a", catalog.VolumeRequest{Name: "pvc-1", RequiredBytes: 10<<20 + 1})
	if err != nil {
		t.Fatal(err)
	}
	if v.Size != 11<<20 || v.Node != "node-a" || v.Type != catalog.Ploop {
		t.Errorf("created %+v, want 11 MiB ploop on node-a", v)
	}
	got, err := a.cat.GetVolume(ctx, v.ID)
	if err != nil || got.Name != "pvc-1" || got.Size != v.Size {
		t.Errorf("node-a's catalogue: %+v, %v", got, err)
	}
	// The controller's answer carries the parameters as the node made the
	// volume, defaults filled in: the volume context the node checks when
	// it stages (found by the end-to-end cluster: "0" against 1048576).
	type params struct {
		fs, mkfs, discard string
		cluster           int64
		inodes            uint64
	}
	if c, n := (params{v.FSType, v.MkfsOptions, v.Discard, v.ClusterSize, v.Inodes}),
		(params{got.FSType, got.MkfsOptions, got.Discard, got.ClusterSize, got.Inodes}); c != n || n.fs == "" || n.cluster == 0 {
		t.Errorf("the controller says %+v, the node made %+v", c, n)
	}
	if _, err := b.cat.GetVolume(ctx, v.ID); !errors.Is(err, catalog.ErrNotFound) {
		t.Errorf("node-b's catalogue has %s: %v", v.ID, err)
	}

	t.Run("Idempotent", func(t *testing.T) {
		again, err := cl.cc.CreateVolumeOn(ctx, "node-a", catalog.VolumeRequest{Name: "pvc-1", RequiredBytes: 10<<20 + 1})
		if err != nil || again.ID != v.ID {
			t.Fatalf("repeat: %+v, %v", again, err)
		}
		_, err = cl.cc.CreateVolumeOn(ctx, "node-a", catalog.VolumeRequest{Name: "pvc-1", RequiredBytes: 20 << 20})
		wantClass(t, err, catalog.ErrExists, "same name, other size")
		_, err = cl.cc.CreateVolumeOn(ctx, "node-b", catalog.VolumeRequest{Name: "pvc-1", RequiredBytes: 10<<20 + 1})
		wantClass(t, err, catalog.ErrExists, "same name, other node")
	})

	t.Run("PermanentFailureLeavesNothing", func(t *testing.T) {
		_, err := cl.cc.CreateVolumeOn(ctx, "node-b", catalog.VolumeRequest{Name: "pvc-huge", RequiredBytes: 8 << 40})
		wantClass(t, err, catalog.ErrNoSpace, "a volume larger than the root")
		// The failed attempt's resource goes, so a retry (on any node)
		// starts clean; the node removed what little it made.
		waitFor(t, ctx, "the failed attempt's resource to go", func() bool {
			var list v1alpha1.PloopVolumeList
			if err := cl.c.List(ctx, &list); err != nil {
				return false
			}
			for _, item := range list.Items {
				if item.Spec.Name == "pvc-huge" {
					return false
				}
			}
			return true
		})
		v2, err := cl.cc.CreateVolumeOn(ctx, "node-b", catalog.VolumeRequest{Name: "pvc-huge", RequiredBytes: 4 << 20})
		if err != nil || v2.Node != "node-b" {
			t.Fatalf("the retry with a size that fits: %+v, %v", v2, err)
		}
		if err := cl.cc.DeleteVolume(ctx, v2.ID); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("Expand", func(t *testing.T) {
		size, nodeExp, err := cl.cc.ExpandVolume(ctx, v.ID, 32<<20, 0)
		if err != nil || size != 32<<20 || !nodeExp {
			t.Fatalf("expand: %d, %t, %v", size, nodeExp, err)
		}
		if got, err := a.cat.GetVolume(ctx, v.ID); err != nil || got.Size != 32<<20 {
			t.Errorf("node-a's catalogue after expand: %+v, %v", got, err)
		}
		size, _, err = cl.cc.ExpandVolume(ctx, v.ID, 16<<20, 0)
		if err != nil || size != 32<<20 {
			t.Errorf("a smaller expand is a no-op: %d, %v", size, err)
		}
		_, _, err = cl.cc.ExpandVolume(ctx, v.ID, 64<<20, 48<<20)
		wantClass(t, err, catalog.ErrInvalid, "required above limit")
	})

	t.Run("SnapshotAndClone", func(t *testing.T) {
		s, err := cl.cc.CreateSnapshot(ctx, "snap-1", v.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := a.cat.GetSnapshot(ctx, s.ID); err != nil || got.SourceVolume != v.ID || s.Size != 32<<20 {
			t.Fatalf("node-a's snapshot: %+v, %v (controller saw %+v)", got, err, s)
		}
		if again, err := cl.cc.CreateSnapshot(ctx, "snap-1", v.ID); err != nil || again.ID != s.ID {
			t.Errorf("repeat snapshot: %+v, %v", again, err)
		}
		clone, err := cl.cc.CreateVolumeOn(ctx, "node-a", catalog.VolumeRequest{Name: "pvc-clone", SourceSnapshot: s.ID})
		if err != nil || clone.Size != 32<<20 || clone.SourceSnapshot != s.ID {
			t.Fatalf("clone: %+v, %v", clone, err)
		}
		list, _, err := cl.cc.ListSnapshots(ctx, catalog.SnapshotFilter{SourceVolume: v.ID}, "", 0)
		if err != nil || len(list) != 1 || list[0].ID != s.ID {
			t.Errorf("ListSnapshots by source: %+v, %v", list, err)
		}
		// The source goes first; its snapshot and clone keep working.
		for _, id := range []string{v.ID, s.ID} {
			var err error
			if id == s.ID {
				err = cl.cc.DeleteSnapshot(ctx, id)
			} else {
				err = cl.cc.DeleteVolume(ctx, id)
			}
			if err != nil {
				t.Fatalf("delete %s: %v", id, err)
			}
		}
		if _, err := a.cat.GetVolume(ctx, v.ID); !errors.Is(err, catalog.ErrNotFound) {
			t.Errorf("the deleted volume is still on node-a: %v", err)
		}
		if _, err := a.cat.GetVolume(ctx, clone.ID); err != nil {
			t.Errorf("the clone after its sources went: %v", err)
		}
		vols, _, err := cl.cc.ListVolumes(ctx, "", 0)
		if err != nil || len(vols) != 1 || vols[0].ID != clone.ID {
			t.Errorf("ListVolumes: %+v, %v", vols, err)
		}
		if err := cl.cc.DeleteVolume(ctx, clone.ID); err != nil {
			t.Fatal(err)
		}
		if err := cl.cc.DeleteVolume(ctx, clone.ID); err != nil {
			t.Errorf("a second delete: %v", err)
		}
	})

	t.Run("DeletingTheResourceDeletesTheVolume", func(t *testing.T) {
		// What an operator's kubectl delete does: the finalizer holds the
		// resource until node-b has removed the volume.
		v, err := cl.cc.CreateVolumeOn(ctx, "node-b", catalog.VolumeRequest{Name: "pvc-kubectl", RequiredBytes: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		if err := cl.c.Delete(ctx, &v1alpha1.PloopVolume{ObjectMeta: objectMeta(v.ID)}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, "the resource to go", func() bool {
			err := cl.c.Get(ctx, client.ObjectKey{Name: v.ID}, &v1alpha1.PloopVolume{})
			return apierrors.IsNotFound(err)
		})
		if _, err := b.cat.GetVolume(ctx, v.ID); !errors.Is(err, catalog.ErrNotFound) {
			t.Errorf("node-b still has the volume: %v", err)
		}
	})

	t.Run("NodeThatNeverAnswers", func(t *testing.T) {
		short, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err := cl.cc.CreateVolumeOn(short, "node-gone", catalog.VolumeRequest{Name: "pvc-stranded", RequiredBytes: 4 << 20})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("create on a node without an agent: %v, want DeadlineExceeded", err)
		}
		// The resource stays for the retry, and for an operator to see.
		var list v1alpha1.PloopVolumeList
		if err := cl.c.List(ctx, &list, client.MatchingLabels{v1alpha1.NodeLabel: "node-gone"}); err != nil || len(list.Items) != 1 {
			t.Fatalf("resources of node-gone: %d, %v", len(list.Items), err)
		}
		// An operator who knows the node is gone for good drops the
		// finalizer; nothing else could.
		item := &list.Items[0]
		controllerutil.RemoveFinalizer(item, v1alpha1.Finalizer)
		if err := cl.c.Update(ctx, item); err != nil {
			t.Fatal(err)
		}
		if err := cl.c.Delete(ctx, item); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("Capacity", func(t *testing.T) {
		// Published at start: what the root promises, as node-a's own
		// catalogue computes it (give or take what others wrote since).
		var got catalog.Capacity
		waitFor(t, ctx, "node-a's capacity", func() bool {
			got, err = cl.cc.CapacityOn(ctx, "node-a", catalog.Ploop)
			return err == nil && got.AvailableBytes > 0
		})
		if local, err := a.cat.Capacity(ctx, catalog.Ploop); err != nil || local.AvailableBytes == 0 {
			t.Fatalf("node-a's own capacity: %+v, %v", local, err)
		}
		// An operation publishes it again at once (the interval is an hour).
		patch := []byte(`{"metadata":{"annotations":{"capacity.ploop.io/ploop":null}}}`)
		if err := cl.c.Patch(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, client.RawPatch(types.MergePatchType, patch)); err != nil {
			t.Fatal(err)
		}
		if c, err := cl.cc.CapacityOn(ctx, "node-a", catalog.Ploop); err != nil || c.AvailableBytes != 0 {
			t.Fatalf("capacity without the annotation: %+v, %v", c, err)
		}
		v, err := cl.cc.CreateVolumeOn(ctx, "node-a", catalog.VolumeRequest{Name: "pvc-capacity", RequiredBytes: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, "node-a's capacity after a create", func() bool {
			got, err = cl.cc.CapacityOn(ctx, "node-a", catalog.Ploop)
			return err == nil && got.AvailableBytes > 0
		})
		if err := cl.cc.DeleteVolume(ctx, v.ID); err != nil {
			t.Fatal(err)
		}
		if c, err := cl.cc.CapacityOn(ctx, "no-such-node", catalog.Ploop); err != nil || c.AvailableBytes != 0 {
			t.Errorf("capacity of an unknown node: %+v, %v", c, err)
		}
		bad := []byte(`{"metadata":{"annotations":{"capacity.ploop.io/simfs":"lots"}}}`)
		if err := cl.c.Patch(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}}, client.RawPatch(types.MergePatchType, bad)); err != nil {
			t.Fatal(err)
		}
		_, err = cl.cc.CapacityOn(ctx, "node-b", catalog.Simfs)
		wantClass(t, err, catalog.ErrUnavailable, "a malformed annotation")
	})

	t.Run("BadIDs", func(t *testing.T) {
		for _, id := range []string{"../etc", "ploop-x", ""} {
			_, err := cl.cc.GetVolume(ctx, id)
			if !errors.Is(err, catalog.ErrInvalid) && !errors.Is(err, catalog.ErrNotFound) {
				t.Errorf("GetVolume(%q): %v", id, err)
			}
			if err := cl.cc.DeleteSnapshot(ctx, id); err != nil && !errors.Is(err, catalog.ErrInvalid) {
				t.Errorf("DeleteSnapshot(%q): %v", id, err)
			}
		}
	})
}

func waitFor(t *testing.T, ctx context.Context, what string, ok func() bool) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !ok() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

func objectMeta(name string) metav1.ObjectMeta { return metav1.ObjectMeta{Name: name} }
