package driver

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

// TestCreateVolumeTranslation: parameters and capabilities become the
// catalogue's request; the response carries the rounded size, the volume
// context the node needs, the node's topology and the content source.
func TestCreateVolumeTranslation(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)

	v := e.create(t, "a", 10*mib+1, map[string]string{
		ParamClusterSize: "64Ki", ParamMkfsOptions: "-E lazy_itable_init=0", ParamDiscard: "online",
		"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "default",
	}, mountCap(snw, "xfs"))
	if v.GetCapacityBytes() != 11*mib {
		t.Errorf("capacity %d, want 11 MiB (rounded up to 1 MiB)", v.GetCapacityBytes())
	}
	wantCtx := map[string]string{"type": "ploop", "fsType": "xfs", "clusterSize": "65536", "discard": "online", "mkfsOptions": "-E lazy_itable_init=0"}
	if !maps.Equal(v.GetVolumeContext(), wantCtx) {
		t.Errorf("volume context %v, want %v", v.GetVolumeContext(), wantCtx)
	}
	if topo := v.GetAccessibleTopology(); len(topo) != 1 || !maps.Equal(topo[0].GetSegments(), map[string]string{TopologyKey: testNode}) {
		t.Errorf("topology %v", topo)
	}
	rec, err := e.cat.GetVolume(ctx, v.GetVolumeId())
	if err != nil {
		t.Fatal(err)
	}
	if rec.Name != "a" || rec.FSType != "xfs" || rec.ClusterSize != 64<<10 || rec.Discard != "online" || rec.Size != 11*mib {
		t.Errorf("catalogue record %+v", rec)
	}

	// The filesystem from the StorageClass parameter when the capability
	// does not say; both saying different things is refused.
	v2 := e.create(t, "b", mib, map[string]string{ParamFSType: "xfs"})
	if v2.GetVolumeContext()[ContextFSType] != "xfs" {
		t.Errorf("fstype parameter ignored: %v", v2.GetVolumeContext())
	}
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "c", Parameters: map[string]string{ParamFSType: "xfs"},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "ext4")}})
	wantCode(t, "fs_type against parameter", err, codes.InvalidArgument, "disagree")

	// A snapshot and a clone: content source echoed, larger size grows.
	sn, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: v.GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	if s := sn.GetSnapshot(); !s.GetReadyToUse() || s.GetSizeBytes() != 11*mib || s.GetSourceVolumeId() != v.GetVolumeId() || s.GetCreationTime() == nil {
		t.Errorf("snapshot %v", s)
	}
	src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sn.GetSnapshot().GetSnapshotId()}}}
	r, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "restored", VolumeContentSource: src,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 20 * mib}, Parameters: map[string]string{ParamDiscard: "online"},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "xfs")}})
	if err != nil {
		t.Fatal(err)
	}
	if r.GetVolume().GetCapacityBytes() != 20*mib || r.GetVolume().GetContentSource().GetSnapshot().GetSnapshotId() != sn.GetSnapshot().GetSnapshotId() {
		t.Errorf("restored volume %v", r.GetVolume())
	}
	clone, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone", Parameters: map[string]string{ParamDiscard: "online"},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.GetVolumeId()}}},
		VolumeCapabilities:  []*csi.VolumeCapability{mountCap(snw, "xfs")}})
	if err != nil {
		t.Fatal(err)
	}
	if clone.GetVolume().GetContentSource().GetVolume().GetVolumeId() != v.GetVolumeId() || clone.GetVolume().GetCapacityBytes() != 11*mib {
		t.Errorf("clone %v", clone.GetVolume())
	}
	// A source of another filesystem is the spec's "source incompatible".
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "clone-ext4", VolumeContentSource: src,
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "ext4")}})
	wantCode(t, "ext4 clone of xfs", err, codes.InvalidArgument, "")

	// simfs on a root without project quota (this host): the precondition
	// is said, not hidden.
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "dir", Parameters: map[string]string{ParamType: "simfs"},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}})
	wantCode(t, "simfs without quota", err, codes.FailedPrecondition, "project quota")
}

// TestParameters: every parameter is checked, unknown keys refused, the
// sidecars' keys ignored.
func TestParameters(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	for i, tc := range []struct {
		params map[string]string
		code   codes.Code
		substr string
	}{
		{map[string]string{ParamType: "lvm"}, codes.InvalidArgument, "ploop or simfs"},
		{map[string]string{ParamClusterSize: "3M"}, codes.InvalidArgument, "clusterSize"},
		{map[string]string{ParamClusterSize: "1Q"}, codes.InvalidArgument, "clusterSize"},
		{map[string]string{ParamClusterSize: "99999999999999999999"}, codes.InvalidArgument, "clusterSize"},
		{map[string]string{ParamInodes: "-1"}, codes.InvalidArgument, "inodes"},
		{map[string]string{ParamInodes: "100"}, codes.InvalidArgument, "simfs"}, // ploop has no inode limit
		{map[string]string{ParamDiscard: "sometimes"}, codes.InvalidArgument, "online"},
		{map[string]string{ParamMkfsOptions: "-O \x00"}, codes.InvalidArgument, "printable"},
		{map[string]string{ParamFSType: "btrfs"}, codes.InvalidArgument, "ext4 or xfs"},
		{map[string]string{ParamAttach: "iscsi"}, codes.InvalidArgument, "nbd or ublk"},
		{map[string]string{ParamAttach: "auto"}, codes.InvalidArgument, "nbd or ublk"}, // auto is the node's
		{map[string]string{ParamAttach: "ublk", ParamType: "simfs"}, codes.InvalidArgument, "ploop volumes only"},
		{map[string]string{ParamAttach: "ublk"}, codes.OK, ""},
		{map[string]string{"clustersize": "1M"}, codes.InvalidArgument, "unknown parameter"},
		{map[string]string{"csi.storage.k8s.io/pv/name": "pv-1"}, codes.OK, ""},
		{map[string]string{ParamClusterSize: "1MiB", ParamType: "ploop"}, codes.OK, ""},
	} {
		_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprint("p", i), Parameters: tc.params,
			CapacityRange: &csi.CapacityRange{RequiredBytes: mib}, VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}})
		wantCode(t, fmt.Sprint(tc.params), err, tc.code, tc.substr)
	}
}

// TestAccessModes: the four single-node modes for mount and block are
// accepted; MULTI_NODE modes are refused with the reason; simfs has no
// Block access.
func TestAccessModes(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	modes := csi.VolumeCapability_AccessMode_Mode_name
	for n := range modes {
		mode := csi.VolumeCapability_AccessMode_Mode(n)
		for _, block := range []bool{false, true} {
			for _, typ := range []string{"ploop", "simfs"} {
				c := mountCap(mode, "")
				if block {
					c = blockCap(mode)
				}
				name := fmt.Sprintf("%s-%v-%s", mode, block, typ)
				_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: map[string]string{ParamType: typ},
					CapacityRange: &csi.CapacityRange{RequiredBytes: mib}, VolumeCapabilities: []*csi.VolumeCapability{c}})
				want, substr := codes.OK, ""
				switch {
				case strings.HasPrefix(mode.String(), "MULTI_NODE"):
					want, substr = codes.InvalidArgument, "node-local"
				case mode == csi.VolumeCapability_AccessMode_UNKNOWN:
					want, substr = codes.InvalidArgument, "not supported"
				case block && typ == "simfs":
					want, substr = codes.InvalidArgument, "block access is not possible for a simfs volume"
				case typ == "simfs":
					want, substr = codes.FailedPrecondition, "project quota" // this host has none
				}
				wantCode(t, name, err, want, substr)

				// ValidateVolumeCapabilities agrees with CreateVolume.
				if want == codes.OK {
					r, err := e.ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{
						VolumeId: e.mustID(t, name), VolumeCapabilities: []*csi.VolumeCapability{c}})
					if err != nil || r.GetConfirmed() == nil {
						t.Errorf("validate %s: %v %v", name, r, err)
					}
				}
			}
		}
	}
	// ValidateVolumeCapabilities refuses what the volume cannot do, with
	// the reason, without an error.
	v := e.create(t, "ext4", mib, nil)
	for _, c := range []*csi.VolumeCapability{
		mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, ""),
		mountCap(snw, "xfs"),
	} {
		r, err := e.ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{
			VolumeId: v.GetVolumeId(), VolumeCapabilities: []*csi.VolumeCapability{c}})
		if err != nil || r.GetConfirmed() != nil || r.GetMessage() == "" {
			t.Errorf("validate %v: %v %v", c, r, err)
		}
	}
	// Missing pieces of a capability are InvalidArgument.
	for _, c := range []*csi.VolumeCapability{
		{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}},
		{AccessMode: &csi.VolumeCapability_AccessMode{Mode: snw}},
		mountCap(snw, "ext4", "rw,\nfoo"),
	} {
		_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "broken", VolumeCapabilities: []*csi.VolumeCapability{c}})
		wantCode(t, fmt.Sprint(c), err, codes.InvalidArgument, "")
	}
}

// mustID finds a volume by name in the catalogue.
func (e *env) mustID(t testing.TB, name string) string {
	t.Helper()
	vs, _, err := e.cat.ListVolumes(ctxT(t), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if v.Name == name {
			return v.ID
		}
	}
	t.Fatalf("no volume named %s", name)
	return ""
}

// TestIdempotency: repeats of every controller call give the same result;
// a repeat with other parameters is AlreadyExists.
func TestIdempotency(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	a := e.create(t, "a", 5*mib, nil)
	for i := 0; i < 3; i++ {
		b := e.create(t, "a", 5*mib, nil)
		if b.GetVolumeId() != a.GetVolumeId() || b.GetCapacityBytes() != a.GetCapacityBytes() {
			t.Fatalf("repeat %d: %v, first %v", i, b, a)
		}
	}
	for _, req := range []*csi.CreateVolumeRequest{
		{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: 6 * mib}, VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}},
		{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: 5 * mib}, VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "xfs")}},
		{Name: "a", CapacityRange: &csi.CapacityRange{RequiredBytes: 5 * mib}, Parameters: map[string]string{ParamDiscard: "online"},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}},
	} {
		_, err := e.ctl.CreateVolume(ctx, req)
		wantCode(t, fmt.Sprint(req), err, codes.AlreadyExists, "exists")
	}

	s1, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: a.GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	s2, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: a.GetVolumeId()})
	if err != nil || s2.GetSnapshot().GetSnapshotId() != s1.GetSnapshot().GetSnapshotId() {
		t.Fatalf("snapshot repeat: %v %v", s2, err)
	}
	other := e.create(t, "other", mib, nil)
	_, err = e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: other.GetVolumeId()})
	wantCode(t, "snapshot name for another source", err, codes.AlreadyExists, "")

	for i := 0; i < 2; i++ {
		r, err := e.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: a.GetVolumeId(),
			CapacityRange: &csi.CapacityRange{RequiredBytes: 9 * mib}})
		if err != nil || r.GetCapacityBytes() != 9*mib || !r.GetNodeExpansionRequired() {
			t.Fatalf("expand %d: %v %v", i, r, err)
		}
	}
	for i := 0; i < 2; i++ {
		if _, err := e.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s1.GetSnapshot().GetSnapshotId()}); err != nil {
			t.Fatalf("delete snapshot %d: %v", i, err)
		}
		if _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: a.GetVolumeId()}); err != nil {
			t.Fatalf("delete volume %d: %v", i, err)
		}
	}
	_, err = e.ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: a.GetVolumeId()})
	wantCode(t, "deleted volume", err, codes.NotFound, "")
}

// TestNodeIdempotency: stage, publish, unpublish and unstage repeat; the
// translation hands the node the same request each time.
func TestNodeIdempotency(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	v := e.create(t, "v", mib, nil)
	staging, target := e.kdir+"/staging", e.kdir+"/target"
	for i := 0; i < 3; i++ {
		if _, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: staging,
			VolumeCapability: mountCap(snw, ""), VolumeContext: v.GetVolumeContext()}); err != nil {
			t.Fatalf("stage %d: %v", i, err)
		}
	}
	for i := 0; i < 3; i++ {
		if _, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: mountCap(snw, "")}); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	_, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: mountCap(snw, ""), Readonly: true})
	wantCode(t, "publish read-only over read-write", err, codes.AlreadyExists, "")
	// Deleting a staged volume is refused while the node has it.
	_, err = e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId()})
	wantCode(t, "delete staged", err, codes.FailedPrecondition, "attached")
	_, err = e.nd.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: staging})
	wantCode(t, "unstage published", err, codes.FailedPrecondition, "")
	for i := 0; i < 3; i++ {
		if _, err := e.nd.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.GetVolumeId(), TargetPath: target}); err != nil {
			t.Fatalf("unpublish %d: %v", i, err)
		}
		if _, err := e.nd.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: staging}); err != nil {
			t.Fatalf("unstage %d: %v", i, err)
		}
	}
	if _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId()}); err != nil {
		t.Fatal(err)
	}
}

// TestPagination: ListVolumes and ListSnapshots page through everything
// once, filter by id and source, and refuse tokens they did not issue.
func TestPagination(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	var ids []string
	for i := 0; i < 5; i++ {
		ids = append(ids, e.create(t, fmt.Sprint("v", i), mib, nil).GetVolumeId())
	}
	slices.Sort(ids)
	var got []string
	token := ""
	pages := 0
	for {
		r, err := e.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.GetEntries()) > 2 {
			t.Fatalf("page of %d entries, max 2", len(r.GetEntries()))
		}
		for _, en := range r.GetEntries() {
			got = append(got, en.GetVolume().GetVolumeId())
		}
		pages++
		if token = r.GetNextToken(); token == "" {
			break
		}
	}
	if !slices.Equal(got, ids) || pages != 3 {
		t.Fatalf("listed %v in %d pages, want %v in 3", got, pages, ids)
	}
	_, err := e.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "invalid-token"})
	wantCode(t, "bad token", err, codes.Aborted, "")
	_, err = e.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: -1})
	wantCode(t, "negative max", err, codes.InvalidArgument, "")

	var snaps []string
	for i, v := range []string{ids[0], ids[0], ids[1]} {
		s, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprint("s", i), SourceVolumeId: v})
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s.GetSnapshot().GetSnapshotId())
	}
	count := func(req *csi.ListSnapshotsRequest) (n int, next string) {
		r, err := e.ctl.ListSnapshots(ctx, req)
		if err != nil {
			t.Fatalf("%v: %v", req, err)
		}
		return len(r.GetEntries()), r.GetNextToken()
	}
	if n, next := count(&csi.ListSnapshotsRequest{MaxEntries: 2}); n != 2 || next == "" {
		t.Errorf("first page %d %q", n, next)
	} else if n, next2 := count(&csi.ListSnapshotsRequest{MaxEntries: 2, StartingToken: next}); n != 1 || next2 != "" {
		t.Errorf("second page %d %q", n, next2)
	}
	if n, _ := count(&csi.ListSnapshotsRequest{SourceVolumeId: ids[0]}); n != 2 {
		t.Errorf("by source: %d", n)
	}
	if n, _ := count(&csi.ListSnapshotsRequest{SnapshotId: snaps[2]}); n != 1 {
		t.Errorf("by id: %d", n)
	}
	if n, _ := count(&csi.ListSnapshotsRequest{SnapshotId: "snap-none"}); n != 0 {
		t.Errorf("by unknown id: %d", n)
	}
	_, err = e.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: "../x"})
	wantCode(t, "hostile snapshot filter", err, codes.InvalidArgument, "")
	_, err = e.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: "invalid"})
	wantCode(t, "bad snapshot token", err, codes.Aborted, "")
	g, err := e.ctl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: snaps[1]})
	if err != nil || g.GetSnapshot().GetSourceVolumeId() != ids[0] {
		t.Errorf("GetSnapshot: %v %v", g, err)
	}
	_, err = e.ctl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: "none-exist-id"})
	wantCode(t, "GetSnapshot of nothing", err, codes.NotFound, "")
}

// TestCapacity: GetCapacity is the catalogue's promise for this node's
// segment, 0 for another node's or for capabilities nothing here has;
// CreateVolume beyond it, or away from this node, is ResourceExhausted at
// once.
func TestCapacity(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	ours := &csi.Topology{Segments: map[string]string{TopologyKey: testNode}}
	theirs := &csi.Topology{Segments: map[string]string{TopologyKey: "node-b"}}
	capOf := func(req *csi.GetCapacityRequest) int64 {
		t.Helper()
		r, err := e.ctl.GetCapacity(ctx, req)
		if err != nil {
			t.Fatalf("GetCapacity %v: %v", req, err)
		}
		return r.GetAvailableCapacity()
	}
	before, err := e.cat.Capacity(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	// The root's free space moves with other writers on this machine; the
	// promise is the catalogue's within what moved meanwhile.
	near := func(got int64) bool {
		d := got - before.AvailableBytes
		return d < 4*gib && d > -4*gib && got > 0
	}
	if got := capOf(&csi.GetCapacityRequest{}); !near(got) {
		t.Errorf("capacity %d, catalogue %d", got, before.AvailableBytes)
	}
	if got := capOf(&csi.GetCapacityRequest{AccessibleTopology: ours, VolumeCapabilities: []*csi.VolumeCapability{blockCap(snw)}}); !near(got) {
		t.Errorf("capacity for our segment %d", got)
	}
	for _, req := range []*csi.GetCapacityRequest{
		{AccessibleTopology: theirs},
		{VolumeCapabilities: []*csi.VolumeCapability{mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, "")}},
		{Parameters: map[string]string{ParamType: "simfs"}, VolumeCapabilities: []*csi.VolumeCapability{blockCap(snw)}},
	} {
		if got := capOf(req); got != 0 {
			t.Errorf("%v: capacity %d, want 0", req, got)
		}
	}
	_, err = e.ctl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"bogus": "1"}})
	wantCode(t, "GetCapacity with a bad parameter", err, codes.InvalidArgument, "")
	// simfs volumes need project quota, which this host's filesystems do
	// not enforce: nothing is promised to them, so that a scheduler picks
	// another node rather than one where every creation fails.
	quota := quotaEnforced(t, e.root)
	simfsReq := &csi.GetCapacityRequest{Parameters: map[string]string{ParamType: "simfs"}, VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}}
	switch got := capOf(simfsReq); {
	case quota != nil && got != 0:
		t.Errorf("simfs capacity %d on a root without project quota (%v), want 0", got, quota)
	case quota == nil && !near(got):
		t.Errorf("simfs capacity %d with project quota, catalogue %d", got, before.AvailableBytes)
	}

	tooBig := (before.AvailableBytes/gib + 16) * gib
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "big", CapacityRange: &csi.CapacityRange{RequiredBytes: tooBig},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}})
	wantCode(t, "beyond capacity", err, codes.ResourceExhausted, "can still be promised")
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "elsewhere",
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{theirs}, Preferred: []*csi.Topology{theirs}},
		VolumeCapabilities:        []*csi.VolumeCapability{mountCap(snw, "")}})
	wantCode(t, "another node's topology", err, codes.ResourceExhausted, testNode)
	if _, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "here", CapacityRange: &csi.CapacityRange{RequiredBytes: mib},
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{theirs, ours}, Preferred: []*csi.Topology{theirs}},
		VolumeCapabilities:        []*csi.VolumeCapability{mountCap(snw, "")}}); err != nil {
		t.Errorf("requisite including this node: %v", err)
	}
	if vs, _, _ := e.cat.ListVolumes(ctx, "", 0); len(vs) != 1 {
		t.Errorf("%d volumes recorded, want 1 (refused creations leave nothing)", len(vs))
	}
}

// quotaEnforced says, from simfs itself, why the filesystem of dir does not
// enforce project quota, or nil when it does.
func quotaEnforced(t *testing.T, dir string) error {
	t.Helper()
	probe, err := os.MkdirTemp(dir, "quota-probe-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(probe)
	r, err := simfs.Open(probe, simfs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	return r.QuotaEnforced()
}

// TestOvercommit: with a small ratio, volumes are promised until the
// root's size × ratio is provisioned (each creation taking what GetCapacity
// offers), and the next is ResourceExhausted at once.
func TestOvercommit(t *testing.T) {
	e := newEnv(t, envOptions{overcommit: 0.001})
	ctx := ctxT(t)
	var provisioned int64
	for i := 0; ; i++ {
		r, err := e.ctl.GetCapacity(ctx, &csi.GetCapacityRequest{})
		if err != nil {
			t.Fatal(err)
		}
		avail := r.GetAvailableCapacity() / mib * mib
		if avail < mib || i == 100 {
			break
		}
		provisioned += e.create(t, fmt.Sprint("v", i), avail, nil).GetCapacityBytes()
	}
	c, err := e.cat.Capacity(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if limit := int64(float64(c.TotalBytes) * 0.001); provisioned > limit || provisioned < limit-2*mib {
		t.Errorf("provisioned %d bytes, the promise is %d (%s)", provisioned, limit, c)
	}
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "over", CapacityRange: &csi.CapacityRange{RequiredBytes: c.AvailableBytes + mib},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}})
	wantCode(t, "over the promise", err, codes.ResourceExhausted, "can still be promised")
}

// TestExpand: controller expansion of both types and what it asks of the
// node.
func TestExpand(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	v := e.create(t, "v", 4*mib, nil)
	r, err := e.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8*mib + 1}, VolumeCapability: blockCap(snw)})
	if err != nil || r.GetCapacityBytes() != 9*mib || !r.GetNodeExpansionRequired() {
		t.Fatalf("expand: %v %v", r, err)
	}
	for _, tc := range []struct {
		req  *csi.ControllerExpandVolumeRequest
		code codes.Code
	}{
		{&csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId()}, codes.InvalidArgument},
		{&csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(), CapacityRange: &csi.CapacityRange{RequiredBytes: -1}}, codes.InvalidArgument},
		{&csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(), CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 62}}, codes.OutOfRange},
		{&csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(), CapacityRange: &csi.CapacityRange{RequiredBytes: 20*mib + 1, LimitBytes: 20 * mib}}, codes.InvalidArgument},
		// The volume has 9 MiB and volumes do not shrink.
		{&csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(), CapacityRange: &csi.CapacityRange{RequiredBytes: mib, LimitBytes: 8 * mib}}, codes.OutOfRange},
		{&csi.ControllerExpandVolumeRequest{VolumeId: "ploop-00000000-0000-4000-8000-000000000000", CapacityRange: &csi.CapacityRange{RequiredBytes: mib}}, codes.NotFound},
	} {
		_, err := e.ctl.ControllerExpandVolume(ctx, tc.req)
		wantCode(t, fmt.Sprint(tc.req), err, tc.code, "")
	}
	if rec, _ := e.cat.GetVolume(ctx, v.GetVolumeId()); rec.Size != 9*mib {
		t.Fatalf("recorded size %d after refused expansions", rec.Size)
	}
}

// TestCapabilities: what the driver claims, and nothing it does not
// implement.
func TestCapabilities(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	info, err := e.id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.GetName() != DefaultName || info.GetVendorVersion() != "v0.0.0-test" {
		t.Fatalf("plugin info %v %v", info, err)
	}
	pc, err := e.id.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var plugin []string
	for _, c := range pc.GetCapabilities() {
		if s := c.GetService(); s != nil {
			plugin = append(plugin, s.GetType().String())
		}
		if x := c.GetVolumeExpansion(); x != nil {
			plugin = append(plugin, "EXPANSION_"+x.GetType().String())
		}
	}
	if want := []string{"CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS", "EXPANSION_ONLINE"}; !slices.Equal(plugin, want) {
		t.Errorf("plugin capabilities %v, want %v", plugin, want)
	}
	cc, err := e.ctl.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var ctl []int32
	for _, c := range cc.GetCapabilities() {
		ctl = append(ctl, int32(c.GetRpc().GetType()))
	}
	want := []int32{1, 5, 6, 15, 3, 9, 4, 12, 11, 13, 7} // 11 is VOLUME_CONDITION (condition.go)
	if !slices.Equal(ctl, want) {
		t.Errorf("controller capabilities %v, want %v", ctl, want)
	}
	nc, err := e.nd.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var node []int32
	for _, c := range nc.GetCapabilities() {
		node = append(node, int32(c.GetRpc().GetType()))
	}
	if want := []int32{1, 3, 2, 4, 5}; !slices.Equal(node, want) { // 4 is VOLUME_CONDITION
		t.Errorf("node capabilities %v, want %v", node, want)
	}
	ni, err := e.nd.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.GetNodeId() != testNode || ni.GetMaxVolumesPerNode() != 16 ||
		!maps.Equal(ni.GetAccessibleTopology().GetSegments(), map[string]string{TopologyKey: testNode}) {
		t.Errorf("node info %v %v", ni, err)
	}
	_, err = e.ctl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{})
	wantCode(t, "ControllerPublishVolume", err, codes.Unimplemented, "")
}
