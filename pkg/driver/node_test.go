package driver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// TestNodeTranslation: what the node service hands the attachments for
// each kind of volume and capability, and how it reads their answers.
func TestNodeTranslation(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	staging := func(n string) string { return e.kdir + "/staging-" + n }
	target := func(n string) string { return e.kdir + "/target-" + n }

	v := e.create(t, "ext4", 4*mib, map[string]string{ParamMkfsOptions: "-E  lazy_itable_init=0 -m 1", ParamDiscard: "online"})
	if _, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: staging("a"),
		VolumeCapability: mountCap(snw, "", "noatime"), VolumeContext: v.GetVolumeContext()}); err != nil {
		t.Fatal(err)
	}
	path, _ := e.cat.VolumePath(v.GetVolumeId())
	want := StageRequest{VolumeID: v.GetVolumeId(), Type: catalog.Ploop, Path: path, StagingPath: staging("a"), FSType: "ext4",
		MkfsOptions: []string{"-E", "lazy_itable_init=0", "-m", "1"}, MountOptions: []string{"noatime"}, OnlineDiscard: true}
	if got := e.node.staged[v.GetVolumeId()]; !sameStage(got, want) {
		t.Errorf("stage request\n got %+v\nwant %+v", got, want)
	}

	// A StorageClass's transport reaches the node through the volume
	// context; a context naming another is refused before the node runs.
	u := e.create(t, "ublk", 4*mib, map[string]string{ParamAttach: AttachUblk})
	if got := u.GetVolumeContext()[ParamAttach]; got != AttachUblk {
		t.Errorf("volume context %v: no attach=ublk", u.GetVolumeContext())
	}
	bad := maps.Clone(u.GetVolumeContext())
	bad[ParamAttach] = "iscsi"
	_, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: u.GetVolumeId(), StagingTargetPath: staging("u"),
		VolumeCapability: mountCap(snw, ""), VolumeContext: bad})
	wantCode(t, "stage with attach=iscsi", err, codes.InvalidArgument, "nbd or ublk")
	if _, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: u.GetVolumeId(), StagingTargetPath: staging("u"),
		VolumeCapability: mountCap(snw, ""), VolumeContext: u.GetVolumeContext()}); err != nil {
		t.Fatal(err)
	}
	if got := e.node.staged[u.GetVolumeId()]; got.Transport != AttachUblk {
		t.Errorf("staged with transport %q, want ublk", got.Transport)
	}

	// An xfs clone is mounted without the UUID check; Block has no
	// filesystem.
	x := e.create(t, "xfs", 4*mib, nil, mountCap(snw, "xfs"))
	clone, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "xclone",
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: x.GetVolumeId()}}},
		VolumeCapabilities:  []*csi.VolumeCapability{mountCap(snw, "xfs")}})
	if err != nil {
		t.Fatal(err)
	}
	cid := clone.GetVolume().GetVolumeId()
	if _, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: cid, StagingTargetPath: staging("c"),
		VolumeCapability: mountCap(snw, "")}); err != nil {
		t.Fatal(err)
	}
	if got := e.node.staged[cid]; got.FSType != "xfs" || !slices.Equal(got.MountOptions, []string{"nouuid"}) {
		t.Errorf("xfs clone staged with %+v", got)
	}
	b := e.create(t, "block", 4*mib, nil, blockCap(snw))
	if _, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: b.GetVolumeId(), StagingTargetPath: staging("b"),
		VolumeCapability: blockCap(snw)}); err != nil {
		t.Fatal(err)
	}
	if got := e.node.staged[b.GetVolumeId()]; !got.Block || got.FSType != "" || got.MountOptions != nil {
		t.Errorf("block staged with %+v", got)
	}

	// Publish: read-only from the flag or the mode; single writer from
	// SINGLE_NODE_SINGLE_WRITER.
	pub := func(id, stg, tgt string, c *csi.VolumeCapability, ro bool) error {
		_, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: stg, TargetPath: tgt,
			VolumeCapability: c, Readonly: ro})
		return err
	}
	if err := pub(v.GetVolumeId(), staging("a"), target("ro"), mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, ""), false); err != nil {
		t.Fatal(err)
	}
	if got := e.node.published[v.GetVolumeId()][target("ro")]; !got.ReadOnly || got.SingleWriter {
		t.Errorf("reader-only publish %+v", got)
	}
	if err := pub(b.GetVolumeId(), staging("b"), target("sw"), blockCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER), false); err != nil {
		t.Fatal(err)
	}
	if got := e.node.published[b.GetVolumeId()][target("sw")]; !got.Block || !got.SingleWriter || got.ReadOnly {
		t.Errorf("single-writer block publish %+v", got)
	}
	wantCode(t, "second target of a single writer", pub(b.GetVolumeId(), staging("b"), target("sw2"),
		blockCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER), false), codes.FailedPrecondition, "another target")
	// Several targets of a multi-writer volume.
	for _, tg := range []string{"m1", "m2"} {
		if err := pub(v.GetVolumeId(), staging("a"), target(tg), mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER, ""), false); err != nil {
			t.Fatalf("publish at %s: %v", tg, err)
		}
	}
	// Not staged: FailedPrecondition for publish (stage first), NotFound
	// for stats.
	wantCode(t, "publish unstaged", pub(x.GetVolumeId(), staging("x"), target("x"), mountCap(snw, ""), false), codes.FailedPrecondition, "not staged")
	_, err = e.nd.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: x.GetVolumeId(), VolumePath: target("x")})
	wantCode(t, "stats of unstaged", err, codes.NotFound, "not staged")
	// What the volume cannot do is the spec's FailedPrecondition at the
	// node; a volume context that contradicts the volume is refused.
	wantCode(t, "xfs capability on ext4", pub(v.GetVolumeId(), staging("a"), target("bad"), mountCap(snw, "xfs"), false), codes.FailedPrecondition, "holds ext4")
	_, err = e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: x.GetVolumeId(), StagingTargetPath: staging("x"),
		VolumeCapability: mountCap(snw, ""), VolumeContext: map[string]string{ContextFSType: "ext4"}})
	wantCode(t, "contradicting volume context", err, codes.InvalidArgument, "volume context")

	// Stats: filesystem usage, inodes, and the condition as VolumeCondition.
	st, err := e.nd.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.GetVolumeId(), VolumePath: target("m1")})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.GetUsage()) != 2 || st.GetUsage()[0].GetUnit() != csi.VolumeUsage_BYTES || st.GetUsage()[0].GetUsed() != 5*mib ||
		st.GetUsage()[1].GetUnit() != csi.VolumeUsage_INODES || st.GetUsage()[1].GetAvailable() != 989 {
		t.Errorf("usage %v", st.GetUsage())
	}
	if c, ok := getCondition(st); !ok || c.Abnormal || c.Message != "volume is healthy" {
		t.Errorf("condition %+v %v", c, ok)
	}
	bs, err := e.nd.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: b.GetVolumeId(), VolumePath: target("sw")})
	if err != nil || len(bs.GetUsage()) != 1 || bs.GetUsage()[0].GetTotal() != 64*mib || bs.GetUsage()[0].GetUsed() != 0 {
		t.Errorf("block usage %v %v", bs, err)
	}
	// Expansion: the device gets the size the controller recorded; asking
	// for more than that is OutOfRange.
	if _, err := e.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.GetVolumeId(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 * mib}}); err != nil {
		t.Fatal(err)
	}
	ex, err := e.nd.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.GetVolumeId(), VolumePath: target("m1"),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 8 * mib}})
	if err != nil || ex.GetCapacityBytes() != 8*mib {
		t.Errorf("node expand %v %v", ex, err)
	}
	_, err = e.nd.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.GetVolumeId(), VolumePath: target("m1"),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 9 * mib}})
	wantCode(t, "node expand beyond the controller's", err, codes.OutOfRange, "ControllerExpandVolume")
	_, err = e.nd.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.GetVolumeId(), VolumePath: e.kdir + "/elsewhere"})
	wantCode(t, "node expand at an unknown path", err, codes.NotFound, "")
	// A range that is no range is refused before anything is looked up,
	// on a volume that is not staged as on one that is.
	for _, id := range []string{v.GetVolumeId(), x.GetVolumeId()} {
		for _, cr := range []*csi.CapacityRange{{RequiredBytes: -1}, {LimitBytes: -1}, {RequiredBytes: 9 * mib, LimitBytes: 8 * mib}} {
			_, err = e.nd.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target("m1"), CapacityRange: cr})
			wantCode(t, fmt.Sprintf("node expand of %s to %v", id, cr), err, codes.InvalidArgument, "capacity_range")
		}
	}
}

// TestLegacyCondition: VolumeCondition reaches a CO built against CSI 1.12
// exactly as a 1.12 plugin sends it.
func TestLegacyCondition(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	v := e.create(t, "v", mib, nil)
	g, err := e.ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	if c, ok := getCondition(g.GetStatus()); !ok || c.Abnormal || c.Message == "" {
		t.Errorf("healthy volume's condition %+v %v", c, ok)
	}
	// The same bytes a 1.12 encoder writes for
	// VolumeCondition{abnormal: true, message: "m"} in field 2.
	st := &csi.NodeGetVolumeStatsResponse{}
	setCondition(st, Condition{Abnormal: true, Message: "m"})
	b, err := proto.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if want := []byte{0x12, 0x05, 0x08, 0x01, 0x12, 0x01, 'm'}; string(b) != string(want) {
		t.Errorf("encoded % x, want % x", b, want)
	}

	// A volume whose top delta was left in use by a dead server is
	// abnormal, with what to do.
	dir, _ := e.cat.VolumePath(v.GetVolumeId())
	markInUse(t, dir)
	g, err = e.ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := getCondition(g.GetStatus()); !c.Abnormal || !strings.Contains(c.Message, "repair") {
		t.Errorf("condition of an image in use: %+v", c)
	}
	l, err := e.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(l.GetEntries()) != 1 {
		t.Fatal(l, err)
	}
	if c, _ := getCondition(l.GetEntries()[0].GetStatus()); !c.Abnormal {
		t.Errorf("listed condition %+v", c)
	}
}

// TestOnlineAdapter: the node's ErrNotAttached is the catalogue's, its busy
// the catalogue's busy; everything else passes unchanged.
func TestOnlineAdapter(t *testing.T) {
	f := newFakeNode()
	on := OnlineOf(f)
	ctx := context.Background()
	if _, err := on.Snapshot(ctx, "v"); !errors.Is(err, catalog.ErrNotAttached) {
		t.Errorf("snapshot: %v", err)
	}
	other := errors.New("disk on fire")
	for _, tc := range []struct {
		err  error
		want error
	}{
		{fmt.Errorf("x: %w", ErrNotAttached), catalog.ErrNotAttached},
		{fmt.Errorf("x: %w", ErrNodeBusy), catalog.ErrBusy},
		{other, other},
	} {
		f.hook = func(string) error { return tc.err }
		for name, call := range map[string]func() error{
			"Attached":       func() error { _, err := on.Attached(ctx, "v"); return err },
			"Snapshot":       func() error { _, err := on.Snapshot(ctx, "v"); return err },
			"DeleteSnapshot": func() error { return on.DeleteSnapshot(ctx, "v", "g") },
			"Grow":           func() error { return on.Grow(ctx, "v", 1) },
			"Compact":        func() error { return on.Compact(ctx, "v") },
		} {
			if err := call(); !errors.Is(err, tc.want) || !errors.Is(err, tc.err) {
				t.Errorf("%s with %v: %v", name, tc.err, err)
			}
		}
	}
}

// markInUse sets the in-use mark of a stack's top delta, as a server
// killed while serving it leaves it.
func markInUse(t *testing.T, dir string) {
	t.Helper()
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	ch := d.Chain()
	f, err := os.OpenFile(filepath.Join(dir, ch[len(ch)-1].File), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], 0x746F6E59)
	if _, err := f.WriteAt(b[:], 44); err != nil {
		t.Fatal(err)
	}
}

// getCondition reads back what setCondition wrote (tests, and COs written
// against this module).
func getCondition(m proto.Message) (Condition, bool) {
	raw := m.ProtoReflect().GetUnknown()
	var c Condition
	found := false
	for len(raw) > 0 {
		num, typ, n := protowire.ConsumeTag(raw)
		if n < 0 {
			return c, false
		}
		raw = raw[n:]
		n = protowire.ConsumeFieldValue(num, typ, raw)
		if n < 0 {
			return c, false
		}
		if num == volumeConditionField && typ == protowire.BytesType {
			inner, _ := protowire.ConsumeBytes(raw[:n])
			c, found = Condition{}, true
			for len(inner) > 0 {
				fnum, ftyp, k := protowire.ConsumeTag(inner)
				if k < 0 {
					return c, false
				}
				inner = inner[k:]
				switch {
				case fnum == 1 && ftyp == protowire.VarintType:
					v, k := protowire.ConsumeVarint(inner)
					if k < 0 {
						return c, false
					}
					c.Abnormal = v != 0
					inner = inner[k:]
				case fnum == 2 && ftyp == protowire.BytesType:
					v, k := protowire.ConsumeString(inner)
					if k < 0 {
						return c, false
					}
					c.Message = v
					inner = inner[k:]
				default:
					k := protowire.ConsumeFieldValue(fnum, ftyp, inner)
					if k < 0 {
						return c, false
					}
					inner = inner[k:]
				}
			}
		}
		raw = raw[n:]
	}
	return c, found
}
