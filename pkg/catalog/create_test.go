package catalog

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// TestCreateVolumeIdempotent: a repeat with the same parameters returns the
// same volume; any parameter that differs is ErrExists and changes nothing.
func TestCreateVolumeIdempotent(t *testing.T) {
	c, root := newCatalog(t, Options{})
	ctx := testCtx(t)
	base := VolumeRequest{Name: "pvc-1", RequiredBytes: 10*mib + 1}
	v := mustCreate(t, c, base)
	if v.Size != 11*mib || v.Type != Ploop || v.FSType != FSExt4 || v.ClusterSize != ploop.DefaultClusterSize || v.Discard != DiscardPeriodic {
		t.Fatalf("defaults: %+v", v)
	}
	dir, err := c.VolumePath(v.ID)
	if err != nil || dir != filepath.Join(root, "ploop", "volumes", v.ID) {
		t.Fatalf("path %q, %v", dir, err)
	}
	qemuCheckStack(t, dir)
	src := mustCreate(t, c, VolumeRequest{Name: "other", RequiredBytes: 11 * mib})
	before := treeHash(t, root)

	same := []VolumeRequest{
		base,
		{Name: "pvc-1", RequiredBytes: 11 * mib},
		{Name: "pvc-1", RequiredBytes: 11 * mib, LimitBytes: 11 * mib},
		{Name: "pvc-1", RequiredBytes: 10*mib + 5, Type: Ploop, FSType: FSExt4, ClusterSize: mib, Discard: DiscardPeriodic},
		{Name: "pvc-1", LimitBytes: 20 * mib},
	}
	for _, req := range same {
		got, err := c.CreateVolume(ctx, req)
		if err != nil || got.ID != v.ID || got.Size != v.Size {
			t.Errorf("repeat %+v: %+v, %v; want %s", req, got, err, v.ID)
		}
	}
	differ := []VolumeRequest{
		{Name: "pvc-1", RequiredBytes: 12 * mib},
		{Name: "pvc-1", RequiredBytes: 10 * mib},
		{Name: "pvc-1", LimitBytes: 5 * mib},
		{Name: "pvc-1", RequiredBytes: 11 * mib, Type: Simfs},
		{Name: "pvc-1", RequiredBytes: 11 * mib, FSType: FSXfs},
		{Name: "pvc-1", RequiredBytes: 11 * mib, ClusterSize: 64 << 10},
		{Name: "pvc-1", RequiredBytes: 11 * mib, MkfsOptions: "-m 0"},
		{Name: "pvc-1", RequiredBytes: 11 * mib, Discard: DiscardOnline},
		{Name: "pvc-1", RequiredBytes: 11 * mib, SourceVolume: src.ID},
		{Name: "pvc-1", RequiredBytes: 11 * mib, SourceSnapshot: NewSnapshotID()},
	}
	for _, req := range differ {
		_, err := c.CreateVolume(ctx, req)
		if req.Type == Simfs {
			// The simfs root is not opened: the name check comes first.
			wantErr(t, err, ErrExists, "different type")
			continue
		}
		wantErr(t, err, ErrExists, "different parameters")
	}
	if after := treeHash(t, root); after != before {
		t.Fatal("repeats changed the root")
	}
	// After a restart the index is rebuilt from the records.
	c = reopen(t, c, Options{})
	if got, err := c.CreateVolume(ctx, base); err != nil || got.ID != v.ID {
		t.Fatalf("repeat after reopen: %+v, %v", got, err)
	}
	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "pvc-1", RequiredBytes: gib})
	wantErr(t, err, ErrExists, "different size after reopen")
	// A deleted name can be used again, for a new volume.
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	v2 := mustCreate(t, c, VolumeRequest{Name: "pvc-1", RequiredBytes: gib})
	if v2.ID == v.ID || v2.Size != gib {
		t.Fatalf("recreated: %+v", v2)
	}
	checkConsistent(t, c)
}

// TestCreateVolumeValidation: sizes round up to the unit and what the
// request or the type cannot allow is refused before anything is made.
func TestCreateVolumeValidation(t *testing.T) {
	c, root := newCatalog(t, Options{})
	ctx := testCtx(t)
	for _, tc := range []struct {
		req  VolumeRequest
		size int64
		want error
	}{
		{VolumeRequest{Name: "a", RequiredBytes: 1}, mib, nil},
		{VolumeRequest{Name: "b"}, DefaultSize, nil},
		{VolumeRequest{Name: "c", LimitBytes: 3*mib + 7}, 0, nil}, // default clamped to the limit, rounded down
		{VolumeRequest{Name: "d", RequiredBytes: 2 * mib, LimitBytes: 2 * mib}, 2 * mib, nil},
		{VolumeRequest{Name: "e", RequiredBytes: 2*mib + 1, LimitBytes: 2*mib + 2}, 0, ErrOutOfRange},
		{VolumeRequest{Name: "f", LimitBytes: 100}, 0, ErrOutOfRange},
		{VolumeRequest{Name: "g", RequiredBytes: 5, LimitBytes: 4}, 0, ErrInvalid},
		{VolumeRequest{Name: "h", RequiredBytes: -1}, 0, ErrInvalid},
		{VolumeRequest{Name: "i", RequiredBytes: 1 << 62}, 0, ErrOutOfRange},
		{VolumeRequest{Name: "j", RequiredBytes: 17 << 40}, 0, ErrOutOfRange}, // more than 2^24 1 MiB clusters
		{VolumeRequest{Name: "k", FSType: "btrfs"}, 0, ErrInvalid},
		{VolumeRequest{Name: "l", ClusterSize: 3 << 20}, 0, ErrInvalid},
		{VolumeRequest{Name: "m", ClusterSize: 16 << 10}, 0, ErrInvalid},
		{VolumeRequest{Name: "n", ClusterSize: 128 << 20}, 0, ErrInvalid},
		{VolumeRequest{Name: "o", Inodes: 100}, 0, ErrInvalid},
		{VolumeRequest{Name: "p", Discard: "sometimes"}, 0, ErrInvalid},
		{VolumeRequest{Name: "q", MkfsOptions: "-E\x00x"}, 0, ErrInvalid},
		{VolumeRequest{Name: "r", Type: "zfs"}, 0, ErrInvalid},
		{VolumeRequest{Name: ""}, 0, ErrInvalid},
		{VolumeRequest{Name: "bad\xff"}, 0, ErrInvalid},
		{VolumeRequest{Name: "s", SourceVolume: NewVolumeID(Ploop), SourceSnapshot: NewSnapshotID()}, 0, ErrInvalid},
		{VolumeRequest{Name: "t", SourceSnapshot: NewSnapshotID()}, 0, ErrNotFound},
		{VolumeRequest{Name: "u", SourceVolume: NewVolumeID(Ploop)}, 0, ErrNotFound},
		{VolumeRequest{Name: "v", SourceVolume: "../../etc"}, 0, ErrInvalid},
		{VolumeRequest{Name: "w", RequiredBytes: 3 * mib, ClusterSize: 64 << 10, FSType: FSXfs, MkfsOptions: "-m reflink=0"}, 3 * mib, nil},
	} {
		before := treeHash(t, root)
		v, err := c.CreateVolume(ctx, tc.req)
		if tc.want != nil {
			wantErr(t, err, tc.want, tc.req.Name)
			if after := treeHash(t, root); after != before {
				t.Fatalf("%s: a refused request changed the root", tc.req.Name)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tc.req.Name, err)
		}
		if tc.size != 0 && v.Size != tc.size {
			t.Errorf("%s: size %d, want %d", tc.req.Name, v.Size, tc.size)
		}
		if v.Size%mib != 0 {
			t.Errorf("%s: size %d is not a MiB multiple", tc.req.Name, v.Size)
		}
		d, err := ploop.ReadDescriptor(filepath.Join(root, "ploop", "volumes", v.ID))
		if err != nil || d.Size() != v.Size || d.ClusterSize() != v.ClusterSize {
			t.Fatalf("%s: stack %v size %d cluster %d; volume %+v", tc.req.Name, err, d.Size(), d.ClusterSize(), v)
		}
	}
	checkConsistent(t, c)
}

// TestOpenValidation: the root must be an absolute, existing, writable
// directory, not a symlink, and one process owns it.
func TestOpenValidation(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(t.TempDir(), link); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		opts Options
		want error
	}{
		{"relative/dir", Options{}, ErrInvalid},
		{dir + "/../" + filepath.Base(dir), Options{}, ErrInvalid},
		{filepath.Join(dir, "missing"), Options{}, ErrUnavailable},
		{file, Options{}, ErrInvalid},
		{link, Options{}, ErrInvalid},
		{dir, Options{OvercommitRatio: -1}, ErrInvalid},
	} {
		if _, err := Open(tc.path, tc.opts); !errors.Is(err, tc.want) {
			t.Errorf("Open(%q, %+v) = %v, want %v", tc.path, tc.opts, err, tc.want)
		}
	}
	c, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("second Open: %v", err)
	}
	if err := c.Health(testCtx(t)); err != nil {
		t.Fatalf("health: %v", err)
	}
	// A record that is not ours stops Open rather than being misread.
	c.Close()
	if err := os.WriteFile(filepath.Join(dir, "catalog", "volumes", NewVolumeID(Ploop)+".json"), []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, Options{}); err == nil {
		t.Fatal("Open accepted a damaged record")
	}
}

// TestHealth: a root that disappears or fills up is reported.
func TestHealth(t *testing.T) {
	free := 100 * mib
	c, root := newCatalog(t, Options{statfs: func(string) (int64, int64, error) { return gib, free, nil }})
	ctx := testCtx(t)
	if err := c.Health(ctx); err != nil {
		t.Fatal(err)
	}
	free = 1 * mib
	wantErr(t, c.Health(ctx), ErrUnavailable, "full root")
	free = 100 * mib
	if err := os.RemoveAll(filepath.Join(root, "ploop")); err != nil {
		t.Fatal(err)
	}
	wantErr(t, c.Health(ctx), ErrUnavailable, "damaged root")
}
