package drivere2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// testHostileIDs: every call that takes a volume or snapshot id is given
// ids that could escape a path ("../x", absolute paths, NUL, 4 KiB),
// well-formed ids of the wrong kind (a snapshot id as a volume id and the
// reverse) and ids of nothing; the calls that take sizes get absurd ones;
// the node calls get staging and target paths inside the storage root or
// outside the kubelet directory. The first two are InvalidArgument, ids of
// nothing NotFound (deletions, unstage and unpublish of them succeed),
// sizes InvalidArgument, OutOfRange or ResourceExhausted as the CSI spec
// asks, and afterwards the storage root
// is byte for byte what it was (every path, mode, owner, size, content and
// link target), nothing more is mounted and no nbd device is connected.
func testHostileIDs(t *testing.T) {
	e := newEnv(t, 256)
	pv := e.create("hostile-target", 64*mib, mountCap("ext4"), nil)
	dir := e.createSimfs("hostile-dir", 16*mib)
	sr, err := e.d.Controller.CreateSnapshot(e.ctx, &csi.CreateSnapshotRequest{Name: "hostile-snap", SourceVolumeId: pv.id})
	if err != nil {
		t.Fatal(err)
	}
	snap := sr.GetSnapshot().GetSnapshotId()

	beforeTree := treeDigest(t, e.root)
	beforeMounts := mountCount(t)

	// Ids no path may be built from: InvalidArgument everywhere.
	invalid := []string{"", "../x", "../../../../etc/passwd", "/etc/passwd", "/", e.root, "..", ".",
		"x/../../y", "ploop-../x", "a\x00b", "ploop-\x00", "\x00", strings.Repeat("a", 4096),
		"ploop-" + strings.Repeat("0", 4090), "-rf", ".hidden", "ploop-" + strings.TrimPrefix(pv.id, "ploop-") + "/..",
		"snap-../" + snap, pv.id + "\n"}
	// An id of the other kind is the caller mixing them up, not an
	// object that is gone: InvalidArgument too, as issue 11 asks, even
	// for the idempotent deletions.
	wrongVolume := []string{snap, "snap-00000000-0000-4000-8000-000000000000"}
	wrongSnapshot := []string{pv.id, dir.id, "ploop-00000000-0000-4000-8000-000000000000"}
	// Well-formed strings that name no volume (or no snapshot).
	noVolume := []string{"ploop-00000000-0000-4000-8000-000000000000", "simfs-00000000-0000-4000-8000-000000000000", "reallyfakevolumeid"}
	noSnapshot := []string{"snap-00000000-0000-4000-8000-000000000000", "fakesnapshot"}

	n := 0
	name := func() string { n++; return fmt.Sprintf("hostile-%d", n) }
	cr := &csi.CapacityRange{RequiredBytes: 128 * mib}
	mc := mountCap("ext4")
	volCalls := []struct {
		call string
		run  func(id string) error
		// notFound is the code for an id of no volume: NotFound, or OK
		// for the calls that are idempotent deletions.
		notFound codes.Code
	}{
		{"NodeStageVolume", func(id string) error {
			_, err := e.d.Node.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: pv.staging, VolumeCapability: mc})
			return err
		}, codes.NotFound},
		{"NodePublishVolume", func(id string) error {
			_, err := e.d.Node.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: pv.staging, TargetPath: pv.target, VolumeCapability: mc})
			return err
		}, codes.NotFound},
		{"NodeUnpublishVolume", func(id string) error {
			_, err := e.d.Node.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: pv.target})
			return err
		}, codes.OK},
		{"NodeUnstageVolume", func(id string) error {
			_, err := e.d.Node.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: pv.staging})
			return err
		}, codes.OK},
		{"NodeGetVolumeStats", func(id string) error {
			_, err := e.d.Node.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: pv.target})
			return err
		}, codes.NotFound},
		{"NodeExpandVolume", func(id string) error {
			_, err := e.d.Node.NodeExpandVolume(e.ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: pv.target, CapacityRange: cr})
			return err
		}, codes.NotFound},
		{"DeleteVolume", func(id string) error {
			_, err := e.d.Controller.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			return err
		}, codes.OK},
		{"ControllerExpandVolume", func(id string) error {
			_, err := e.d.Controller.ControllerExpandVolume(e.ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: cr})
			return err
		}, codes.NotFound},
		{"ControllerGetVolume", func(id string) error {
			_, err := e.d.Controller.ControllerGetVolume(e.ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
			return err
		}, codes.NotFound},
		{"ValidateVolumeCapabilities", func(id string) error {
			_, err := e.d.Controller.ValidateVolumeCapabilities(e.ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: []*csi.VolumeCapability{mc}})
			return err
		}, codes.NotFound},
		{"CreateSnapshot", func(id string) error {
			_, err := e.d.Controller.CreateSnapshot(e.ctx, &csi.CreateSnapshotRequest{Name: name(), SourceVolumeId: id})
			return err
		}, codes.NotFound},
		{"CreateVolume(source volume)", func(id string) error {
			_, err := e.d.Controller.CreateVolume(e.ctx, createReq(name(), 64*mib, mc, &csi.VolumeContentSource{
				Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}))
			return err
		}, codes.NotFound},
		{"ListSnapshots(source)", func(id string) error {
			r, err := e.d.Controller.ListSnapshots(e.ctx, &csi.ListSnapshotsRequest{SourceVolumeId: id})
			if err == nil && len(r.GetEntries()) > 0 {
				return fmt.Errorf("listed %v", r.GetEntries())
			}
			return err
		}, codes.OK},
	}
	snapCalls := []struct {
		call     string
		run      func(id string) error
		notFound codes.Code
	}{
		{"DeleteSnapshot", func(id string) error {
			_, err := e.d.Controller.DeleteSnapshot(e.ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
			return err
		}, codes.OK},
		{"GetSnapshot", func(id string) error {
			_, err := e.d.Controller.GetSnapshot(e.ctx, &csi.GetSnapshotRequest{SnapshotId: id})
			return err
		}, codes.NotFound},
		{"CreateVolume(source snapshot)", func(id string) error {
			_, err := e.d.Controller.CreateVolume(e.ctx, createReq(name(), 64*mib, mc, &csi.VolumeContentSource{
				Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}))
			return err
		}, codes.NotFound},
		{"ListSnapshots(id)", func(id string) error {
			r, err := e.d.Controller.ListSnapshots(e.ctx, &csi.ListSnapshotsRequest{SnapshotId: id})
			if err == nil && len(r.GetEntries()) > 0 {
				return fmt.Errorf("listed %v", r.GetEntries())
			}
			return err
		}, codes.OK},
	}
	checks := 0
	check := func(what string, err error, want ...codes.Code) {
		t.Helper()
		checks++
		if !slices.Contains(want, status.Code(err)) {
			t.Errorf("%s: %v (%v), want %v", what, status.Code(err), err, want)
		}
	}
	for _, c := range volCalls {
		for _, id := range invalid {
			if id == "" && c.call == "ListSnapshots(source)" {
				continue // no filter: a list of everything
			}
			check(fmt.Sprintf("%s(%q)", c.call, short(id)), c.run(id), codes.InvalidArgument)
		}
		for _, id := range wrongVolume {
			check(fmt.Sprintf("%s(snapshot id %q)", c.call, id), c.run(id), codes.InvalidArgument)
		}
		for _, id := range noVolume {
			check(fmt.Sprintf("%s(%q)", c.call, id), c.run(id), c.notFound)
		}
	}
	for _, c := range snapCalls {
		for _, id := range invalid {
			if id == "" && c.call == "ListSnapshots(id)" {
				continue // no filter: a list of everything
			}
			check(fmt.Sprintf("%s(%q)", c.call, short(id)), c.run(id), codes.InvalidArgument)
		}
		for _, id := range wrongSnapshot {
			check(fmt.Sprintf("%s(volume id %q)", c.call, id), c.run(id), codes.InvalidArgument)
		}
		for _, id := range noSnapshot {
			check(fmt.Sprintf("%s(%q)", c.call, id), c.run(id), c.notFound)
		}
	}

	// Absurd sizes.
	for _, tc := range []struct {
		what     string
		req, lim int64
		want     []codes.Code
	}{
		{"negative required", -1, 0, []codes.Code{codes.InvalidArgument}},
		{"negative limit", 0, -1, []codes.Code{codes.InvalidArgument}},
		{"min int64", math.MinInt64, math.MinInt64, []codes.Code{codes.InvalidArgument}},
		{"limit below required", 128 * mib, 64 * mib, []codes.Code{codes.InvalidArgument, codes.OutOfRange}},
		{"1 byte limit", 0, 1, []codes.Code{codes.OutOfRange}},
		{"1 MiB + 1 rounds past the limit", mib + 1, 2*mib - 1, []codes.Code{codes.OutOfRange}},
		{"2^62 bytes", 1 << 62, 0, []codes.Code{codes.OutOfRange}},
		{"max int64", math.MaxInt64, 0, []codes.Code{codes.OutOfRange}},
		{"max int64 limit", math.MaxInt64, math.MaxInt64, []codes.Code{codes.OutOfRange}},
		{"15 TiB, more than the root", 15 << 40, 0, []codes.Code{codes.ResourceExhausted}},
	} {
		_, err := e.d.Controller.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: name(), Parameters: map[string]string{"type": "ploop"},
			CapacityRange: &csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim}, VolumeCapabilities: []*csi.VolumeCapability{mc}})
		check("CreateVolume "+tc.what, err, tc.want...)
	}
	for _, tc := range []struct {
		what     string
		req, lim int64
		want     []codes.Code
	}{
		{"negative required", -1, 0, []codes.Code{codes.InvalidArgument}},
		{"negative limit", 0, -1, []codes.Code{codes.InvalidArgument}},
		{"no size", 0, 0, []codes.Code{codes.InvalidArgument}},
		{"limit below required", 128 * mib, 96 * mib, []codes.Code{codes.InvalidArgument, codes.OutOfRange}},
		// The ploop volume has 64 MiB, the simfs one 16: neither can be
		// made at most 15 MiB.
		{"limit below the volume's size", 8 * mib, 15 * mib, []codes.Code{codes.OutOfRange}},
		{"2^62 bytes", 1 << 62, 0, []codes.Code{codes.OutOfRange}},
		{"max int64", math.MaxInt64, 0, []codes.Code{codes.OutOfRange}},
		{"15 TiB, more than the root", 15 << 40, 0, []codes.Code{codes.ResourceExhausted}},
	} {
		for _, v := range []*vol{pv, dir} {
			_, err := e.d.Controller.ControllerExpandVolume(e.ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.id,
				CapacityRange: &csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim}})
			check(fmt.Sprintf("ControllerExpandVolume %s: %s", v.name, tc.what), err, tc.want...)
		}
	}
	for _, tc := range []struct {
		what     string
		req, lim int64
		want     codes.Code
	}{
		{"negative required", -1, 0, codes.InvalidArgument},
		{"negative limit", 0, -1, codes.InvalidArgument},
		{"limit below required", 128 * mib, 96 * mib, codes.InvalidArgument},
		{"more than the controller gave", 1 << 62, 0, codes.OutOfRange},
		{"limit below the volume's size", 0, 48 * mib, codes.OutOfRange},
	} {
		_, err := e.d.Node.NodeExpandVolume(e.ctx, &csi.NodeExpandVolumeRequest{VolumeId: pv.id, VolumePath: pv.target,
			CapacityRange: &csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim}})
		check("NodeExpandVolume "+tc.what, err, tc.want)
	}

	// Paths: inside the storage root, outside the kubelet directory,
	// relative, with NUL or "..".
	for _, p := range []string{e.root, filepath.Join(e.root, "catalog"), filepath.Join(e.root, "ploop", "volumes", pv.id),
		"/etc", "/", "relative/path", e.work + "/../etc", e.work + "/x\x00y", e.work + "/a/../../b", filepath.Dir(e.work)} {
		_, err := e.d.Node.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: pv.id, StagingTargetPath: p, VolumeCapability: mc, VolumeContext: pv.vctx})
		check(fmt.Sprintf("NodeStageVolume at %q", p), err, codes.InvalidArgument)
		_, err = e.d.Node.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: pv.id, StagingTargetPath: pv.staging, TargetPath: p, VolumeCapability: mc, VolumeContext: pv.vctx})
		check(fmt.Sprintf("NodePublishVolume at %q", p), err, codes.InvalidArgument)
		_, err = e.d.Node.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: pv.id, StagingTargetPath: p})
		check(fmt.Sprintf("NodeUnstageVolume at %q", p), err, codes.InvalidArgument)
		_, err = e.d.Node.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: pv.id, TargetPath: p})
		check(fmt.Sprintf("NodeUnpublishVolume at %q", p), err, codes.InvalidArgument)
		_, err = e.d.Node.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: pv.id, VolumePath: p})
		check(fmt.Sprintf("NodeGetVolumeStats at %q", p), err, codes.InvalidArgument, codes.NotFound)
	}
	// Names: NUL, 4 KiB.
	for _, nm := range []string{"a\x00b", strings.Repeat("n", 4096)} {
		_, err := e.d.Controller.CreateVolume(e.ctx, createReq(nm, 64*mib, mc, nil))
		check(fmt.Sprintf("CreateVolume named %q", short(nm)), err, codes.InvalidArgument)
		_, err = e.d.Controller.CreateSnapshot(e.ctx, &csi.CreateSnapshotRequest{Name: nm, SourceVolumeId: pv.id})
		check(fmt.Sprintf("CreateSnapshot named %q", short(nm)), err, codes.InvalidArgument)
	}

	if after := treeDigest(t, e.root); after.sum != beforeTree.sum {
		t.Errorf("the storage root changed:\n%s", diffLines(beforeTree.listing, after.listing))
	}
	if m := mountCount(t); m != beforeMounts {
		t.Errorf("%d mounts before the hostile calls, %d after", beforeMounts, m)
	}
	if pids, _ := filepath.Glob("/sys/block/nbd*/pid"); len(pids) > 0 {
		t.Errorf("nbd devices connected: %v", pids)
	}
	if !t.Failed() {
		t.Logf("%d hostile calls refused as expected; the storage root (%d entries, digest %s) is unchanged",
			checks, strings.Count(beforeTree.listing, "\n"), beforeTree.sum[:16])
	}

	for _, id := range []string{pv.id, dir.id} {
		if _, err := e.d.Controller.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.Controller.DeleteSnapshot(e.ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap}); err != nil {
		t.Fatal(err)
	}
	e.finish()
}

// createSimfs makes a simfs volume of size bytes.
func (e *env) createSimfs(name string, size int64) *vol {
	e.t.Helper()
	r, err := e.d.Controller.CreateVolume(e.ctx, &csi.CreateVolumeRequest{Name: name, Parameters: map[string]string{"type": "simfs"},
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{mountCap("")}})
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return e.withCap(&vol{id: r.GetVolume().GetVolumeId(), name: name, size: size, vctx: r.GetVolume().GetVolumeContext()}, mountCap(""))
}

func short(s string) string {
	if len(s) > 40 {
		return fmt.Sprintf("%s...(%d bytes)", s[:20], len(s))
	}
	return s
}

type digest struct{ sum, listing string }

// treeDigest lists every entry under root (not following symlinks) with
// its type and permissions, owner, size, and the SHA-256 of a regular
// file's content or a symlink's target, and hashes the listing.
func treeDigest(t *testing.T, root string) digest {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		rel, _ := filepath.Rel(root, p)
		fmt.Fprintf(&b, "%q %v %d:%d %d", rel, fi.Mode(), st.Uid, st.Gid, fi.Size())
		switch {
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " %x", h.Sum(nil))
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " -> %q", target)
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(b.String()))
	return digest{sum: hex.EncodeToString(sum[:]), listing: b.String()}
}

// diffLines lists the lines only in a (-) and only in b (+).
func diffLines(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out strings.Builder
	for _, l := range al {
		if !slices.Contains(bl, l) {
			out.WriteString("- " + l + "\n")
		}
	}
	for _, l := range bl {
		if !slices.Contains(al, l) {
			out.WriteString("+ " + l + "\n")
		}
	}
	return out.String()
}

func mountCount(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}
