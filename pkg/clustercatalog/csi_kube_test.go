package clustercatalog_test

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/clustercatalog"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
)

var _ driver.Cluster = (*clustercatalog.Catalog)(nil)

// serveCSI serves d on a socket until the test ends and connects to it.
func serveCSI(t *testing.T, d *driver.Driver) *grpc.ClientConn {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx, lis) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		stop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return conn
}

// TestCSIControllerMode drives the driver in ModeController over the
// cluster's catalogue: the CSI calls an external-provisioner, -snapshotter
// and -resizer make land on the storage root of the node the topology
// names, and the answers carry that node's segment.
func TestCSIControllerMode(t *testing.T) {
	cl := newCluster(t, "node-a", "node-b")
	ctx := tctx(t, 3*time.Minute)
	d, err := driver.New(driver.Config{Version: "test", NodeID: "controller-0", Mode: driver.ModeController, Catalog: cl.cc})
	if err != nil {
		t.Fatal(err)
	}
	conn := serveCSI(t, d)
	ctl, id := csi.NewControllerClient(conn), csi.NewIdentityClient(conn)

	caps, err := id.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil || len(caps.GetCapabilities()) != 3 {
		t.Fatalf("plugin capabilities: %v, %v", caps, err)
	}
	if _, err := id.Probe(ctx, &csi.ProbeRequest{}); err != nil {
		t.Fatalf("probe: %v", err)
	}
	if _, err := csi.NewNodeClient(conn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); status.Code(err) != codes.Unimplemented {
		t.Errorf("a controller serves node calls: %v", err)
	}

	seg := func(node string) *csi.Topology {
		return &csi.Topology{Segments: map[string]string{driver.TopologyKey: node}}
	}
	mount := []*csi.VolumeCapability{{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}}
	create := func(name string, req *csi.CreateVolumeRequest) (*csi.Volume, error) {
		req.Name, req.VolumeCapabilities = name, mount
		resp, err := ctl.CreateVolume(ctx, req)
		return resp.GetVolume(), err
	}
	// WaitForFirstConsumer: the scheduler's node comes first in preferred.
	vol, err := create("pvc-b", &csi.CreateVolumeRequest{
		CapacityRange:             &csi.CapacityRange{RequiredBytes: 8 << 20},
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{seg("node-a"), seg("node-b")}, Preferred: []*csi.Topology{seg("node-b"), seg("node-a")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := vol.GetAccessibleTopology(); len(got) != 1 || got[0].GetSegments()[driver.TopologyKey] != "node-b" {
		t.Errorf("volume topology %v, want node-b's", got)
	}
	if _, err := cl.nodes["node-b"].cat.GetVolume(ctx, vol.GetVolumeId()); err != nil {
		t.Fatalf("the volume is not on node-b's root: %v", err)
	}

	t.Run("NoNodeNamed", func(t *testing.T) {
		_, err := create("pvc-nowhere", &csi.CreateVolumeRequest{CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("create without accessibility requirements: %v, want InvalidArgument", err)
		}
	})

	t.Run("TooLargeForTheNode", func(t *testing.T) {
		_, err := create("pvc-huge", &csi.CreateVolumeRequest{
			CapacityRange:             &csi.CapacityRange{RequiredBytes: 8 << 40},
			AccessibilityRequirements: &csi.TopologyRequirement{Preferred: []*csi.Topology{seg("node-a")}},
		})
		if status.Code(err) != codes.ResourceExhausted {
			t.Errorf("create beyond the node's capacity: %v, want ResourceExhausted", err)
		}
	})

	t.Run("Capacity", func(t *testing.T) {
		waitFor(t, ctx, "node-a's capacity through GetCapacity", func() bool {
			resp, err := ctl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: seg("node-a"), VolumeCapabilities: mount})
			return err == nil && resp.GetAvailableCapacity() > 0
		})
		resp, err := ctl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: seg("node-gone"), VolumeCapabilities: mount})
		if err != nil || resp.GetAvailableCapacity() != 0 {
			t.Errorf("capacity of a node without a plugin: %v, %v", resp, err)
		}
	})

	t.Run("SnapshotCloneExpandDelete", func(t *testing.T) {
		snap, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-b", SourceVolumeId: vol.GetVolumeId()})
		if err != nil || !snap.GetSnapshot().GetReadyToUse() {
			t.Fatalf("snapshot: %v, %v", snap, err)
		}
		sid := snap.GetSnapshot().GetSnapshotId()
		// The clone goes where its snapshot is, whatever the scheduler
		// preferred, as long as the requisite segments allow it.
		clone, err := create("pvc-clone", &csi.CreateVolumeRequest{
			VolumeContentSource:       &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sid}}},
			AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{seg("node-a"), seg("node-b")}, Preferred: []*csi.Topology{seg("node-a")}},
		})
		if err != nil {
			t.Fatal(err)
		}
		if got := clone.GetAccessibleTopology()[0].GetSegments()[driver.TopologyKey]; got != "node-b" {
			t.Errorf("the clone is on %s, its snapshot on node-b", got)
		}
		_, err = create("pvc-clone-elsewhere", &csi.CreateVolumeRequest{
			VolumeContentSource:       &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sid}}},
			AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{seg("node-a")}},
		})
		if status.Code(err) != codes.ResourceExhausted {
			t.Errorf("a clone required on another node than its source: %v, want ResourceExhausted", err)
		}
		exp, err := ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol.GetVolumeId(),
			CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapability: mount[0]})
		if err != nil || exp.GetCapacityBytes() != 16<<20 || !exp.GetNodeExpansionRequired() {
			t.Fatalf("expand: %v, %v", exp, err)
		}
		got, err := ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: vol.GetVolumeId()})
		if err != nil || got.GetVolume().GetCapacityBytes() != 16<<20 {
			t.Errorf("ControllerGetVolume: %v, %v", got, err)
		}
		list, err := ctl.ListVolumes(ctx, &csi.ListVolumesRequest{})
		if err != nil || len(list.GetEntries()) != 2 {
			t.Errorf("ListVolumes: %v, %v", list, err)
		}
		page, err := ctl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 1})
		if err != nil || len(page.GetEntries()) != 1 || page.GetNextToken() == "" {
			t.Fatalf("ListVolumes page 1: %v, %v", page, err)
		}
		rest, err := ctl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: page.GetNextToken()})
		if err != nil || len(rest.GetEntries()) != 1 || rest.GetEntries()[0].GetVolume().GetVolumeId() == page.GetEntries()[0].GetVolume().GetVolumeId() {
			t.Errorf("ListVolumes page 2: %v, %v", rest, err)
		}
		if _, err := ctl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "garbage"}); status.Code(err) != codes.Aborted {
			t.Errorf("ListVolumes with a token not ours: %v, want Aborted", err)
		}
		for _, id := range []string{clone.GetVolumeId(), vol.GetVolumeId()} {
			if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
				t.Fatalf("delete %s: %v", id, err)
			}
		}
		if _, err := ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sid}); err != nil {
			t.Fatal(err)
		}
		for _, n := range cl.nodes {
			vols, _, err := n.cat.ListVolumes(ctx, "", 0)
			snaps, _, serr := n.cat.ListSnapshots(ctx, catalog.SnapshotFilter{}, "", 0)
			if err != nil || serr != nil || len(vols) != 0 || len(snaps) != 0 {
				t.Errorf("%s keeps %d volumes, %d snapshots (%v, %v)", n.name, len(vols), len(snaps), err, serr)
			}
		}
	})

	t.Run("DeadlineWhileTheNodeWorks", func(t *testing.T) {
		short, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := ctl.CreateVolume(short, &csi.CreateVolumeRequest{Name: "pvc-gone", VolumeCapabilities: mount,
			AccessibilityRequirements: &csi.TopologyRequirement{Preferred: []*csi.Topology{seg("node-gone")}}})
		if c := status.Code(err); c != codes.DeadlineExceeded && !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("create on a node that never answers: %v, want DeadlineExceeded", err)
		}
	})
}
