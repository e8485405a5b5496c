package catalog

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestHostileIDs: every entry point that takes an id validates it before
// any filesystem call: hostile ids are ErrInvalid, ids of the wrong kind
// are ErrNotFound (or a successful no-op for deletions), and the root is
// byte-for-byte unchanged.
func TestHostileIDs(t *testing.T) {
	c, root := newCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 4 * mib})
	s := mustSnapshot(t, c, "s", v.ID)
	// A target outside the root that a path walk could reach.
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "x"), []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(c.stacks(), outside)
	if err != nil {
		t.Fatal(err)
	}
	hostile := []string{
		"../x", "..", "../../../../../../etc/passwd", rel, outside, "/", "/etc",
		"ploop-" + newUUID() + "/../../catalog", "a\x00b", "\x00", strings.Repeat("p", 4096),
		"ploop-" + newUUID() + "\n", " ploop-" + newUUID(), ".ploop-x", "ploop-*",
	}
	wrongKind := []string{s.ID, "snap-" + newUUID(), "reallyfakevolumeid", "ploop-" + newUUID(), "simfs-" + newUUID()}
	wrongKindSnap := []string{v.ID, "ploop-" + newUUID(), "fake-snapshot", "snap-" + newUUID()}

	before := treeHash(t, root)
	beforeOut := treeHash(t, outside)
	type call struct {
		name string
		fn   func(id string) error
	}
	volCalls := []call{
		{"GetVolume", func(id string) error { _, err := c.GetVolume(ctx, id); return err }},
		{"ExpandVolume", func(id string) error { _, _, err := c.ExpandVolume(ctx, id, 8*mib, 0); return err }},
		{"VolumePath", func(id string) error { _, err := c.VolumePath(id); return err }},
		{"VolumeUsage", func(id string) error { _, err := c.VolumeUsage(ctx, id); return err }},
		{"Condition", func(id string) error { _, err := c.Condition(ctx, id); return err }},
		{"Compact", func(id string) error { return c.Compact(ctx, id) }},
		{"CreateSnapshot", func(id string) error { _, err := c.CreateSnapshot(ctx, "hostile-snap", id); return err }},
		{"CreateVolume from volume", func(id string) error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "hostile-clone", SourceVolume: id})
			return err
		}},
		{"ListSnapshots by source", func(id string) error {
			l, _, err := c.ListSnapshots(ctx, SnapshotFilter{SourceVolume: id}, "", 0)
			if err == nil && len(l) != 0 {
				return errors.New("listed snapshots")
			}
			return err
		}},
	}
	snapCalls := []call{
		{"GetSnapshot", func(id string) error { _, err := c.GetSnapshot(ctx, id); return err }},
		{"CreateVolume from snapshot", func(id string) error {
			_, err := c.CreateVolume(ctx, VolumeRequest{Name: "hostile-restore", SourceSnapshot: id})
			return err
		}},
		{"ListSnapshots by id", func(id string) error {
			l, _, err := c.ListSnapshots(ctx, SnapshotFilter{SnapshotID: id}, "", 0)
			if err == nil && len(l) != 0 {
				return errors.New("listed snapshots")
			}
			return err
		}},
	}
	for _, cl := range volCalls {
		for _, id := range hostile {
			if err := cl.fn(id); !errors.Is(err, ErrInvalid) {
				t.Errorf("%s(%q) = %v, want ErrInvalid", cl.name, id, err)
			}
		}
		for _, id := range wrongKind {
			err := cl.fn(id)
			if strings.HasPrefix(cl.name, "ListSnapshots") {
				if err != nil {
					t.Errorf("%s(%q) = %v, want an empty list", cl.name, id, err)
				}
				continue
			}
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("%s(%q) = %v, want ErrNotFound", cl.name, id, err)
			}
		}
	}
	for _, cl := range snapCalls {
		for _, id := range hostile {
			if err := cl.fn(id); !errors.Is(err, ErrInvalid) {
				t.Errorf("%s(%q) = %v, want ErrInvalid", cl.name, id, err)
			}
		}
		for _, id := range wrongKindSnap {
			err := cl.fn(id)
			if strings.HasPrefix(cl.name, "ListSnapshots") {
				if err != nil {
					t.Errorf("%s(%q) = %v, want an empty list", cl.name, id, err)
				}
				continue
			}
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("%s(%q) = %v, want ErrNotFound", cl.name, id, err)
			}
		}
	}
	for _, id := range hostile {
		if err := c.DeleteVolume(ctx, id); !errors.Is(err, ErrInvalid) {
			t.Errorf("DeleteVolume(%q) = %v, want ErrInvalid", id, err)
		}
		if err := c.DeleteSnapshot(ctx, id); !errors.Is(err, ErrInvalid) {
			t.Errorf("DeleteSnapshot(%q) = %v, want ErrInvalid", id, err)
		}
	}
	// Deleting what is not there (a snapshot id as a volume id included)
	// succeeds and does nothing.
	for _, id := range wrongKind {
		if err := c.DeleteVolume(ctx, id); err != nil {
			t.Errorf("DeleteVolume(%q) = %v", id, err)
		}
	}
	for _, id := range wrongKindSnap {
		if err := c.DeleteSnapshot(ctx, id); err != nil {
			t.Errorf("DeleteSnapshot(%q) = %v", id, err)
		}
	}
	// Absurd sizes and hostile names.
	for _, req := range []VolumeRequest{
		{Name: "huge", RequiredBytes: 1 << 62},
		{Name: "negative", RequiredBytes: -5},
		{Name: "nul\x00name"},
		{Name: strings.Repeat("n", 4096)},
	} {
		if _, err := c.CreateVolume(ctx, req); !errors.Is(err, ErrOutOfRange) && !errors.Is(err, ErrInvalid) {
			t.Errorf("CreateVolume(%q, %d) = %v", req.Name[:min(len(req.Name), 10)], req.RequiredBytes, err)
		}
	}
	// v has 4 MiB: an expansion to at most 3 MiB cannot be met, whatever
	// it requires (volumes do not shrink).
	for _, r := range [][2]int64{{1 << 62, 0}, {2 * mib, 3 * mib}, {0, 3 * mib}, {0, 1}} {
		if _, _, err := c.ExpandVolume(ctx, v.ID, r[0], r[1]); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("absurd expansion [%d, %d]: %v", r[0], r[1], err)
		}
	}
	if size, _, err := c.ExpandVolume(ctx, v.ID, 2*mib, 4*mib); err != nil || size != 4*mib {
		t.Errorf("expansion to at most the volume's size: %d, %v", size, err)
	}
	if _, err := c.CreateSnapshot(ctx, "nul\x00", v.ID); !errors.Is(err, ErrInvalid) {
		t.Errorf("snapshot with a NUL name: %v", err)
	}
	if after := treeHash(t, root); after != before {
		t.Fatal("the root changed")
	}
	if after := treeHash(t, outside); after != beforeOut {
		t.Fatal("a directory outside the root changed")
	}
}

// TestSymlinkedStack: a stack directory replaced by a symlink out of the
// root is not followed by deletion.
func TestSymlinkedStack(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: mib})
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "precious"), []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := c.stackDir(v.ID)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, dir); err != nil {
		t.Fatal(err)
	}
	before := treeHash(t, outside)
	_ = c.DeleteVolume(ctx, v.ID)
	if after := treeHash(t, outside); after != before {
		t.Fatal("delete followed the symlink out of the root")
	}
	if _, err := os.Lstat(dir); !os.IsNotExist(err) {
		t.Fatalf("the symlink is still there: %v", err)
	}
}
