package clustercatalog_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/clustercatalog"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
	"github.com/ploop-csi/ploop-csi/pkg/nodeagent"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

// servingNode stands for a node plugin's attachments on a shared root, as
// far as the controller can tell: it holds a volume's stack open for
// writing (and so its directory's lock), as the NBD server of a node that
// staged the volume does, and carries out online operations on that open
// stack. The kernel attach beneath is what the VM tests prove; here the
// stacks, their lock and the operations are real.
type servingNode struct {
	name, root string
	rep        *nodeagent.Reporter

	mu     sync.Mutex
	stacks map[string]*ploop.Stack
	ops    []string
}

var _ catalog.Online = (*servingNode)(nil)

func (n *servingNode) stackDir(id string) string {
	return filepath.Join(n.root, "ploop", "volumes", id)
}

// serve opens the volume's stack as staging it would, and records it.
func (n *servingNode) serve(ctx context.Context, id string) error {
	s, err := ploop.OpenStack(n.stackDir(id), ploop.StackOptions{})
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.stacks[id] = s
	n.mu.Unlock()
	return n.rep.Served(ctx, id)
}

// release closes the stack as unstaging would, and records it.
func (n *servingNode) release(ctx context.Context, id string) error {
	n.mu.Lock()
	s := n.stacks[id]
	delete(n.stacks, id)
	n.mu.Unlock()
	if s != nil {
		if err := s.Close(); err != nil {
			return err
		}
	}
	return n.rep.Released(ctx, id)
}

func (n *servingNode) served(op, id string) (*ploop.Stack, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	s := n.stacks[id]
	if s == nil {
		return nil, fmt.Errorf("%s %s on %s: %w", op, id, n.name, catalog.ErrNotAttached)
	}
	n.ops = append(n.ops, op)
	return s, nil
}

func (n *servingNode) done() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.ops)
}

func (n *servingNode) Attached(ctx context.Context, id string) (bool, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.stacks[id] != nil, nil
}

func (n *servingNode) Snapshot(ctx context.Context, id string) (string, error) {
	s, err := n.served("snapshot", id)
	if err != nil {
		return "", err
	}
	guid, _, err := s.Snapshot()
	return guid, err
}

func (n *servingNode) DeleteSnapshot(ctx context.Context, id, guid string) error {
	s, err := n.served("deleteSnapshot", id)
	if err != nil {
		return err
	}
	_, err = s.DeleteSnapshot(guid)
	return err
}

func (n *servingNode) Grow(ctx context.Context, id string, size int64) error {
	s, err := n.served("grow", id)
	if err != nil {
		return err
	}
	_, err = s.Grow(size)
	return err
}

func (n *servingNode) Compact(ctx context.Context, id string) error {
	s, err := n.served("compact", id)
	if err != nil {
		return err
	}
	_, _, err = s.Compact()
	return err
}

// TestSharedRoot drives the controller of a shared storage root through
// CSI against two node agents on a real API server: the controller makes
// and deletes images in the root itself and gives volumes no topology; an
// operation on a volume a node serves goes to that node, which the
// volume's status names; the stack's lock keeps a second node from
// serving it; a stale record is cleared by the node it names.
func TestSharedRoot(t *testing.T) {
	srv := kubeapi.StartT(t, kubeapi.Options{})
	ctx := tctx(t, 3*time.Minute)
	if err := srv.InstallCRDs(ctx, filepath.Join("..", "..", "charts", "ploop-csi", "crds", "*.yaml")); err != nil {
		t.Fatal(err)
	}
	c, scheme, err := srv.Client(v1alpha1.AddToScheme)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	opts := clustercatalog.Options{Poll: 20 * time.Millisecond}
	cat, err := catalog.Open(root, catalog.Options{Online: clustercatalog.NewSharedOnline(c, opts)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cat.Close() })
	if _, err := catalog.Open(root, catalog.Options{}); !errors.Is(err, catalog.ErrHeld) {
		t.Errorf("a second controller opened the shared root's catalogue: %v, want ErrHeld", err)
	}

	nodes := map[string]*servingNode{}
	for _, name := range []string{"node-a", "node-b"} {
		n := &servingNode{name: name, root: root, stacks: map[string]*ploop.Stack{}}
		mgr := nodeManager(t, srv, scheme, name, nodeagent.SharedCacheOptions(name))
		if n.rep, err = nodeagent.SetupShared(mgr, nodeagent.SharedOptions{NodeName: name, Online: n}); err != nil {
			t.Fatal(err)
		}
		startManager(t, mgr, name)
		nodes[name] = n
	}
	a, b := nodes["node-a"], nodes["node-b"]

	shared := clustercatalog.NewShared(cat, c, opts)
	d, err := driver.New(driver.Config{Version: "test", NodeID: "controller-0", Mode: driver.ModeController, Catalog: shared, SharedRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	conn := serveCSI(t, d)
	ctl := csi.NewControllerClient(conn)

	caps, err := csi.NewIdentityClient(conn).GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, pc := range caps.GetCapabilities() {
		if pc.GetService().GetType() == csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS {
			t.Errorf("a shared root claims accessibility constraints: %v", caps)
		}
	}
	mount := []*csi.VolumeCapability{{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}}
	anyNode := &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{driver.TopologyKey: "node-z"}}}}
	created, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-s1", VolumeCapabilities: mount,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, AccessibilityRequirements: anyNode})
	if err != nil {
		t.Fatal(err)
	}
	vol := created.GetVolume()
	id := vol.GetVolumeId()
	if len(vol.GetAccessibleTopology()) != 0 {
		t.Errorf("a volume of a shared root has topology %v", vol.GetAccessibleTopology())
	}
	if _, err := os.Stat(filepath.Join(a.stackDir(id), "DiskDescriptor.xml")); err != nil {
		t.Errorf("the controller made no image in the root: %v", err)
	}
	var res v1alpha1.PloopVolume
	if err := c.Get(ctx, client.ObjectKey{Name: id}, &res); err != nil {
		t.Fatal(err)
	}
	if res.Status.Phase != v1alpha1.Ready || res.Status.VolumeID != id || res.Status.Size.Value() != 16<<20 ||
		res.Spec.NodeName != "" || res.Labels[v1alpha1.NodeLabel] != "" || res.Status.Allocated == nil {
		t.Errorf("the volume's resource: spec %+v, status %+v, labels %v", res.Spec, res.Status, res.Labels)
	}
	if again, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-s1", VolumeCapabilities: mount,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}}); err != nil || again.GetVolume().GetVolumeId() != id {
		t.Errorf("repeated CreateVolume: %v, %v", again, err)
	}
	if _, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-dir", VolumeCapabilities: mount,
		Parameters: map[string]string{driver.ParamType: "simfs"}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a simfs volume on a shared root: %v, want InvalidArgument", err)
	}
	capa, err := ctl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: anyNode.Requisite[0]})
	if err != nil || capa.GetAvailableCapacity() <= 0 {
		t.Errorf("GetCapacity for any segment: %v, %v", capa, err)
	}

	waitRecord := func(t *testing.T, want string) {
		t.Helper()
		waitFor(t, ctx, fmt.Sprintf("the volume's record to name %q", want), func() bool {
			var v v1alpha1.PloopVolume
			err := c.Get(ctx, client.ObjectKey{Name: id}, &v)
			return err == nil && v.Status.AttachedNode == want && v.Labels[v1alpha1.AttachedLabel] == want
		})
	}

	if err := a.serve(ctx, id); err != nil {
		t.Fatal(err)
	}
	waitRecord(t, "node-a")

	t.Run("OneServer", func(t *testing.T) {
		if err := b.serve(ctx, id); err == nil {
			t.Fatal("a second node opened a stack that another node serves")
		}
	})

	var sid string
	t.Run("OnlineOnTheServingNode", func(t *testing.T) {
		snap, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-s1", SourceVolumeId: id})
		if err != nil {
			t.Fatal(err)
		}
		sid = snap.GetSnapshot().GetSnapshotId()
		if !snap.GetSnapshot().GetReadyToUse() {
			t.Errorf("snapshot not ready: %v", snap)
		}
		var sres v1alpha1.PloopSnapshot
		if err := c.Get(ctx, client.ObjectKey{Name: sid}, &sres); err != nil || !sres.Status.ReadyToUse || sres.Spec.SourceVolume != id {
			t.Errorf("the snapshot's resource: %+v, %v", sres, err)
		}
		exp, err := ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}, VolumeCapability: mount[0]})
		if err != nil || exp.GetCapacityBytes() != 32<<20 || !exp.GetNodeExpansionRequired() {
			t.Fatalf("expand: %v, %v", exp, err)
		}
		a.mu.Lock()
		size := a.stacks[id].Size()
		a.mu.Unlock()
		if size != 32<<20 {
			t.Errorf("the served stack has %d bytes after the expansion, want %d", size, 32<<20)
		}
		clone, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-s1-clone", VolumeCapabilities: mount,
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
				Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}})
		if err != nil || clone.GetVolume().GetCapacityBytes() != 32<<20 {
			t.Fatalf("clone of a served volume: %v, %v", clone, err)
		}
		if got, want := a.done(), []string{"snapshot", "grow", "snapshot"}; !slices.Equal(got, want) {
			t.Errorf("node-a carried out %v, want %v", got, want)
		}
		if got := b.done(); len(got) != 0 {
			t.Errorf("node-b, which does not serve the volume, carried out %v", got)
		}
		if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); status.Code(err) != codes.FailedPrecondition {
			t.Errorf("delete a served volume: %v, want FailedPrecondition", err)
		}
		if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: clone.GetVolume().GetVolumeId()}); err != nil {
			t.Errorf("delete the clone: %v", err)
		}
	})

	t.Run("Offline", func(t *testing.T) {
		if err := a.release(ctx, id); err != nil {
			t.Fatal(err)
		}
		waitRecord(t, "")
		before := len(a.done())
		snap, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-s2", SourceVolumeId: id})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(a.done()); n != before {
			t.Errorf("a snapshot of a volume no node serves went to node-a")
		}
		if _, err := ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshot().GetSnapshotId()}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("StaleRecord", func(t *testing.T) {
		// node-b is recorded as serving the volume, but does not: its
		// reconciler clears the record.
		if err := b.rep.Served(ctx, id); err != nil {
			t.Fatal(err)
		}
		waitRecord(t, "")
	})

	t.Run("Delete", func(t *testing.T) {
		if _, err := ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sid}); err != nil {
			t.Fatal(err)
		}
		if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
		if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("repeated delete: %v", err)
		}
		for _, obj := range []client.Object{&v1alpha1.PloopVolume{}, &v1alpha1.PloopSnapshot{}} {
			name := id
			if _, ok := obj.(*v1alpha1.PloopSnapshot); ok {
				name = sid
			}
			if err := c.Get(ctx, client.ObjectKey{Name: name}, obj); !apierrors.IsNotFound(err) {
				t.Errorf("%s outlives its volume or snapshot: %v", name, err)
			}
		}
		if _, err := os.Stat(a.stackDir(id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the image outlives DeleteVolume: %v", err)
		}
	})
}
