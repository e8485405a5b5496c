package driver

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// treeState is everything about a directory tree a request could change:
// every entry's path, type, mode, size, mtime, link target and content.
func treeState(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		desc := fmt.Sprintf("%v %d %d", st.Mode(), st.Size(), st.ModTime().UnixNano())
		switch {
		case st.Mode()&os.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			desc += " -> " + l
		case st.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		out[p] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestHostileRequests: hostile ids (../x, absolute paths, NUL, 4 KiB, a
// snapshot id where a volume id belongs and the reverse), hostile paths and
// absurd sizes are refused with InvalidArgument or OutOfRange (NotFound
// where a path only names where to look), before anything reaches the
// catalogue or the node: the storage root is byte-for-byte unchanged and
// the node was never called.
func TestHostileRequests(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	vol := e.create(t, "v", mib, nil).GetVolumeId()
	sn, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	snap := sn.GetSnapshot().GetSnapshotId()
	before := treeState(t, e.root)
	e.node.calls = nil

	long := strings.Repeat("a", 4096)
	hostileIDs := []string{"../x", "../../etc", "/etc/passwd", "ploop-/../../x", "a\x00b", long, ".", "..", "ploop-" + long}
	good := e.kdir + "/ok"
	hostilePaths := []string{"relative/path", "/a/../b", "/a/b/", "/x\x00y", "/" + strings.Repeat("p", 5000), e.root,
		e.root + "/ploop/volumes/" + vol, "/", filepath.Dir(e.root)}
	mount := mountCap(snw, "")

	type call struct {
		name string
		fn   func() error
		want []codes.Code
	}
	inv := []codes.Code{codes.InvalidArgument}
	var calls []call
	add := func(name string, want []codes.Code, fn func() error) { calls = append(calls, call{name, fn, want}) }
	for _, id := range append(hostileIDs, snap) {
		q := fmt.Sprintf("%.40q", id)
		add("DeleteVolume "+q, inv, func() error { _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); return err })
		add("ControllerGetVolume "+q, inv, func() error {
			_, err := e.ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
			return err
		})
		add("ValidateVolumeCapabilities "+q, inv, func() error {
			_, err := e.ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{mount}})
			return err
		})
		add("ControllerExpandVolume "+q, inv, func() error {
			_, err := e.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * mib}})
			return err
		})
		add("CreateSnapshot of "+q, inv, func() error {
			_, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "hostile", SourceVolumeId: id})
			return err
		})
		add("CreateVolume from volume "+q, inv, func() error {
			_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "hostile", VolumeCapabilities: []*csi.VolumeCapability{mount},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}})
			return err
		})
		add("NodeStageVolume "+q, inv, func() error {
			_, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: good, VolumeCapability: mount})
			return err
		})
		add("NodeUnstageVolume "+q, inv, func() error {
			_, err := e.nd.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: good})
			return err
		})
		add("NodePublishVolume "+q, inv, func() error {
			_, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: good, TargetPath: good + "2", VolumeCapability: mount})
			return err
		})
		add("NodeUnpublishVolume "+q, inv, func() error {
			_, err := e.nd.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: good})
			return err
		})
		add("NodeGetVolumeStats "+q, inv, func() error {
			_, err := e.nd.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: good})
			return err
		})
		add("NodeExpandVolume "+q, inv, func() error {
			_, err := e.nd.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: good})
			return err
		})
	}
	for _, id := range append(hostileIDs, vol) {
		q := fmt.Sprintf("%.40q", id)
		add("DeleteSnapshot "+q, inv, func() error {
			_, err := e.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
			return err
		})
		add("GetSnapshot "+q, inv, func() error { _, err := e.ctl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: id}); return err })
		add("ListSnapshots "+q, inv, func() error {
			_, err := e.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: id})
			return err
		})
		add("CreateVolume from snapshot "+q, inv, func() error {
			_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "hostile", VolumeCapabilities: []*csi.VolumeCapability{mount},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}})
			return err
		})
	}
	for _, p := range hostilePaths {
		q := fmt.Sprintf("%.40q", p)
		add("NodeStageVolume at "+q, inv, func() error {
			_, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol, StagingTargetPath: p, VolumeCapability: mount})
			return err
		})
		add("NodeUnstageVolume at "+q, inv, func() error {
			_, err := e.nd.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: p})
			return err
		})
		add("NodePublishVolume to "+q, inv, func() error {
			_, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: good, TargetPath: p, VolumeCapability: mount})
			return err
		})
		add("NodePublishVolume from "+q, inv, func() error {
			_, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol, StagingTargetPath: p, TargetPath: good, VolumeCapability: mount})
			return err
		})
		add("NodeUnpublishVolume at "+q, inv, func() error {
			_, err := e.nd.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: p})
			return err
		})
		// Stats and expansion only compare the path with where the volume
		// is: a path of the wrong shape names no volume.
		look := []codes.Code{codes.InvalidArgument, codes.NotFound}
		add("NodeGetVolumeStats at "+q, look, func() error {
			_, err := e.nd.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol, VolumePath: p})
			return err
		})
		add("NodeExpandVolume at "+q, look, func() error {
			_, err := e.nd.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: vol, VolumePath: p})
			return err
		})
	}
	oor := []codes.Code{codes.InvalidArgument, codes.OutOfRange}
	for _, cr := range []*csi.CapacityRange{
		{RequiredBytes: -1}, {LimitBytes: -1}, {RequiredBytes: 2 * mib, LimitBytes: mib}, {RequiredBytes: 1 << 62},
		{RequiredBytes: catalog.MaxSize + 1}, {LimitBytes: 1}, {RequiredBytes: 1<<63 - 1},
	} {
		q := fmt.Sprint(cr)
		add("CreateVolume sized "+q, oor, func() error {
			_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "absurd", CapacityRange: cr, VolumeCapabilities: []*csi.VolumeCapability{mount}})
			return err
		})
		add("ControllerExpandVolume to "+q, oor, func() error {
			_, err := e.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol, CapacityRange: cr})
			return err
		})
	}
	for _, c := range calls {
		err := c.fn()
		ok := false
		for _, w := range c.want {
			ok = ok || codeOfErr(err) == w
		}
		if !ok {
			t.Errorf("%s: %v, want one of %v", c.name, err, c.want)
		}
	}
	t.Logf("%d hostile requests refused", len(calls))
	after := treeState(t, e.root)
	for p, d := range before {
		if after[p] != d {
			t.Errorf("%s changed: %q → %q", p, d, after[p])
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s appeared", p)
		}
	}
	for _, c := range e.node.calls {
		if c != "Attached" {
			t.Errorf("the node was called: %v", e.node.calls)
			break
		}
	}
}

// TestMountPaths: staging and target paths must stay out of the storage
// root and, when the kubelet's directory is given, inside it.
func TestMountPaths(t *testing.T) {
	kubelet := t.TempDir()
	e := newEnv(t, envOptions{prefixes: []string{kubelet}})
	ctx := ctxT(t)
	v := e.create(t, "v", mib, nil)
	for _, tc := range []struct {
		path string
		code codes.Code
	}{
		{kubelet + "/plugins/x/globalmount", codes.OK},
		{kubelet, codes.InvalidArgument},
		{kubelet + "-other/x", codes.InvalidArgument},
		{e.kdir + "/x", codes.InvalidArgument},
		{e.root + "/x", codes.InvalidArgument},
	} {
		_, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: tc.path, VolumeCapability: mountCap(snw, "")})
		wantCode(t, tc.path, err, tc.code, "")
	}
}

// TestRequiredFields: each missing field is InvalidArgument, checked before
// the fields that are there (csi-sanity asks this of ids that name
// nothing).
func TestRequiredFields(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	fake := "fake-vol-id-0123456789"
	for name, fn := range map[string]func() error{
		"CreateVolume name": func() error {
			_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}})
			return err
		},
		"CreateVolume caps": func() error { _, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x"}); return err },
		"DeleteVolume id":   func() error { _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{}); return err },
		"CreateSnapshot name": func() error {
			_, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: fake})
			return err
		},
		"CreateSnapshot source": func() error {
			_, err := e.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s"})
			return err
		},
		"NodeStage path": func() error {
			_, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: fake, VolumeCapability: mountCap(snw, "")})
			return err
		},
		"NodePublish path": func() error {
			_, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: fake})
			return err
		},
		"NodePublish cap": func() error {
			_, err := e.nd.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: fake, TargetPath: e.kdir + "/t"})
			return err
		},
		"NodeUnpublish path": func() error {
			_, err := e.nd.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fake})
			return err
		},
		"NodeUnstage path": func() error {
			_, err := e.nd.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: fake})
			return err
		},
		"NodeGetVolumeStats path": func() error {
			_, err := e.nd.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: fake})
			return err
		},
		"NodeExpand path": func() error {
			_, err := e.nd.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: fake})
			return err
		},
	} {
		wantCode(t, name, fn(), codes.InvalidArgument, "required")
	}
	// Ids of no object of ours: deletions succeed, lookups are NotFound.
	for name, fn := range map[string]func() error{
		"DeleteVolume": func() error { _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: fake}); return err },
		"DeleteSnapshot": func() error {
			_, err := e.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: "fake"})
			return err
		},
		"NodeUnstage": func() error {
			_, err := e.nd.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: fake, StagingTargetPath: e.kdir + "/s"})
			return err
		},
		"NodeUnpublish": func() error {
			_, err := e.nd.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fake, TargetPath: e.kdir + "/t"})
			return err
		},
	} {
		wantCode(t, name, fn(), codes.OK, "")
	}
	_, err := e.nd.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: fake, VolumePath: "some/path"})
	wantCode(t, "stats of nothing", err, codes.NotFound, "")
	_, err = e.ctl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: fake, VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}})
	wantCode(t, "validate nothing", err, codes.NotFound, "")
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snap-00000000-0000-4000-8000-000000000000"}}}})
	wantCode(t, "clone of a snapshot that is gone", err, codes.NotFound, "")
}
