package catalog

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

func fakeDirsOptions() Options { return Options{openDirs: openDiskDirs} }

// TestSimfsVolumes checks the catalogue's own logic for simfs volumes
// against the on-disk stand-in (the host has no project quota; TestKernel
// repeats the essentials against the real simfs).
func TestSimfsVolumes(t *testing.T) {
	c, _ := newCatalog(t, fakeDirsOptions())
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", Type: Simfs, RequiredBytes: 4097})
	if v.Size != 8192 || v.Inodes != simfs.DefaultInodes(8192) || v.Type != Simfs || !strings.HasPrefix(v.ID, "simfs-") {
		t.Fatalf("volume %+v", v)
	}
	if again := mustCreate(t, c, VolumeRequest{Name: "v", Type: Simfs, RequiredBytes: 8192}); again.ID != v.ID {
		t.Fatal("repeat made another volume")
	}
	for _, req := range []VolumeRequest{
		{Name: "v", Type: Simfs, RequiredBytes: 16384},
		{Name: "v", Type: Simfs, RequiredBytes: 8192, Inodes: 10},
		{Name: "v", RequiredBytes: 8192},
	} {
		_, err := c.CreateVolume(ctx, req)
		wantErr(t, err, ErrExists, "different parameters")
	}
	for _, req := range []VolumeRequest{
		{Name: "cs", Type: Simfs, ClusterSize: 1 << 20},
		{Name: "in", Type: Simfs, Inodes: simfs.MaxInodes + 1},
	} {
		_, err := c.CreateVolume(ctx, req)
		if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrOutOfRange) {
			t.Errorf("%s: %v", req.Name, err)
		}
	}
	_, err := c.CreateVolume(ctx, VolumeRequest{Name: "lim", Type: Simfs, RequiredBytes: 4097, LimitBytes: 5000})
	wantErr(t, err, ErrOutOfRange, "a limit below the rounded size")
	withInodes := mustCreate(t, c, VolumeRequest{Name: "inodes", Type: Simfs, RequiredBytes: mib, Inodes: 77})
	if withInodes.Inodes != 77 {
		t.Fatalf("inodes %d", withInodes.Inodes)
	}

	dir, err := c.VolumePath(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	size, node, err := c.ExpandVolume(ctx, v.ID, mib+1, 0)
	if err != nil || size != mib+4096 || node {
		t.Fatalf("expand: %d %v %v", size, node, err)
	}
	if got, _ := c.GetVolume(ctx, v.ID); got.Size != size || got.Inodes != simfs.DefaultInodes(uint64(size)) {
		t.Fatalf("after expansion %+v", got)
	}
	s := mustSnapshot(t, c, "s", v.ID)
	if s.Type != Simfs || s.Size != size {
		t.Fatalf("snapshot %+v", s)
	}
	if err := os.WriteFile(filepath.Join(dir, "g"), []byte("later"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := mustCreate(t, c, VolumeRequest{Name: "r", Type: Simfs, SourceSnapshot: s.ID})
	rdir, _ := c.VolumePath(r.ID)
	if got := listDir(t, rdir); !slices.Equal(got, []string{"f"}) {
		t.Fatalf("restored %v", got)
	}
	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "small", Type: Simfs, SourceSnapshot: s.ID, RequiredBytes: 4096})
	wantErr(t, err, ErrOutOfRange, "restore smaller than the snapshot")
	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "p", SourceSnapshot: s.ID})
	wantErr(t, err, ErrInvalid, "ploop from a simfs snapshot")

	cl := mustCreate(t, c, VolumeRequest{Name: "cl", Type: Simfs, SourceVolume: v.ID})
	cdir, _ := c.VolumePath(cl.ID)
	if got := listDir(t, cdir); !slices.Equal(got, []string{"f", "g"}) {
		t.Fatalf("clone %v", got)
	}
	d, _ := c.dirs()
	if snaps := d.(*diskDirs).names("snapshots"); len(snaps) != 2 { // s and its meta
		t.Fatalf("the clone's copy snapshot was left: %v", snaps)
	}
	u, err := c.VolumeUsage(ctx, cl.ID)
	if err != nil || u.AllocatedBytes != 10 || u.ProvisionedBytes != cl.Size {
		t.Fatalf("usage %+v, %v", u, err)
	}
	capa, _ := c.Capacity(ctx, "")
	if capa.ProvisionedBytes != size+withInodes.Size+r.Size+cl.Size {
		t.Fatalf("capacity %+v", capa)
	}
	if cond, err := c.Condition(ctx, v.ID); err != nil || cond.Abnormal {
		t.Fatalf("condition %+v, %v", cond, err)
	}
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	r2 := mustCreate(t, c, VolumeRequest{Name: "r2", Type: Simfs, SourceSnapshot: s.ID})
	if err := c.DeleteSnapshot(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{r.ID, r2.ID, cl.ID, withInodes.ID} {
		if err := c.DeleteVolume(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if left := d.(*diskDirs).names("volumes"); len(left) != 0 {
		t.Fatalf("left %v", left)
	}
	checkConsistent(t, c)
}

// TestSimfsWithoutQuota: on a root whose filesystem does not enforce
// project quota (this host's), a simfs volume is refused with a clear
// ErrPrecondition and ploop volumes are not affected.
func TestSimfsWithoutQuota(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	_, err := c.CreateVolume(ctx, VolumeRequest{Name: "s", Type: Simfs, RequiredBytes: mib})
	if errors.Is(err, ErrPrecondition) && strings.Contains(err.Error(), "prjquota") {
		t.Logf("refused as expected: %v", err)
	} else {
		d, derr := c.dirs()
		if derr == nil && d.QuotaEnforced() == nil {
			t.Skip("this filesystem enforces project quota; TestKernel covers simfs here")
		}
		t.Fatalf("simfs without quota: %v", err)
	}
	mustCreate(t, c, VolumeRequest{Name: "p", RequiredBytes: mib})
	checkConsistent(t, c)
	if l, _, _ := c.ListVolumes(ctx, "", 0); len(l) != 1 {
		t.Fatalf("volumes %v", l)
	}
	// GetCapacity must not lead a scheduler here for simfs volumes.
	if capa, err := c.Capacity(ctx, Simfs); err != nil || capa.AvailableBytes != 0 || !errors.Is(capa.Refused, ErrPrecondition) {
		t.Fatalf("simfs capacity without quota: %+v, %v", capa, err)
	}
	if capa, err := c.Capacity(ctx, Ploop); err != nil || capa.AvailableBytes == 0 {
		t.Fatalf("ploop capacity: %+v, %v", capa, err)
	}
}

// TestSharedSimfsRoot: a process that shares the storage root's simfs root
// between the catalogue and the node's attachments opens it once
// (OpenSimfs); the catalogue uses that Root rather than a second one on the
// same directory, and leaves closing it to the caller.
func TestSharedSimfsRoot(t *testing.T) {
	dir := t.TempDir()
	r, err := OpenSimfs(dir, simfs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if r.Path() != filepath.Join(dir, "simfs") {
		t.Fatalf("simfs root at %s", r.Path())
	}
	c, err := Open(dir, Options{SimfsRoot: r})
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.dirs()
	if err != nil || d != dirVolumes(r) {
		t.Fatalf("the catalogue's simfs root is %v (%v), not the shared one", d, err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get("simfs-none"); !errors.Is(err, simfs.ErrNotFound) {
		t.Fatalf("the shared root after the catalogue closed: %v", err)
	}

	other, err := OpenSimfs(t.TempDir(), simfs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := Open(dir, Options{SimfsRoot: other}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("another root's simfs root: %v", err)
	}
	for _, bad := range []string{"relative", "/a/../b", filepath.Join(dir, "missing")} {
		if r, err := OpenSimfs(bad, simfs.Options{}); err == nil {
			r.Close()
			t.Errorf("OpenSimfs(%q) succeeded", bad)
		}
	}
}
