package catalog

import (
	"os"
	"path/filepath"
	"testing"
)

// TestView: a node's view of a shared root reads each record as the
// owner last wrote it, sees nothing that is not ready, validates ids before
// any file is read, and serves nothing but ploop paths.
func TestView(t *testing.T) {
	ctx := testCtx(t)
	empty := t.TempDir()
	early, err := OpenView(empty)
	if err != nil {
		t.Fatalf("a view of a root the controller has not opened yet: %v", err)
	}
	wantErr(t, early.Health(ctx), ErrUnavailable, "health before the owner made the layout")
	_, err = early.GetVolume(ctx, NewVolumeID(Ploop))
	wantErr(t, err, ErrNotFound, "a volume before the layout exists")
	for _, dir := range []string{"relative", "/a/../b", filepath.Join(empty, "missing")} {
		if _, err := OpenView(dir); err == nil {
			t.Errorf("OpenView(%q) succeeded", dir)
		}
	}

	c, root := newCatalog(t, Options{})
	v, err := OpenView(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Health(ctx); err != nil {
		t.Fatalf("health: %v", err)
	}
	vol := mustCreate(t, c, VolumeRequest{Name: "pvc-1", RequiredBytes: 8 * mib, FSType: FSXfs, MkfsOptions: "-m crc=1"})
	got, err := v.GetVolume(ctx, vol.ID)
	if err != nil || got != vol {
		t.Fatalf("view: %+v, %v; owner: %+v", got, err, vol)
	}
	if _, _, err := c.ExpandVolume(ctx, vol.ID, 16*mib, 0); err != nil {
		t.Fatal(err)
	}
	if got, err := v.GetVolume(ctx, vol.ID); err != nil || got.Size != 16*mib {
		t.Errorf("after the owner grew it: %+v, %v", got, err)
	}
	if p, err := v.VolumePath(vol.ID); err != nil || p != c.stackDir(vol.ID) {
		t.Errorf("path %q, %v; the owner's is %q", p, err, c.stackDir(vol.ID))
	}
	_, err = v.VolumePath(NewVolumeID(Simfs))
	wantErr(t, err, ErrInvalid, "a simfs path on a shared root")

	for _, tt := range []struct {
		id    string
		class error
	}{
		{"../../etc/passwd", ErrInvalid},
		{"", ErrInvalid},
		{NewSnapshotID(), ErrNotFound},
		{NewVolumeID(Ploop), ErrNotFound},
	} {
		_, err := v.GetVolume(ctx, tt.id)
		wantErr(t, err, tt.class, "GetVolume("+tt.id+")")
	}

	// A record being created or deleted is not a volume yet, or any more.
	rec := *c.vols[vol.ID]
	rec.State = stateDeleting
	if err := c.vrec.write(vol.ID, &rec); err != nil {
		t.Fatal(err)
	}
	_, err = v.GetVolume(ctx, vol.ID)
	wantErr(t, err, ErrNotFound, "a volume being deleted")
	// A damaged record is an error, not a volume.
	if err := os.WriteFile(c.vrec.path(vol.ID), []byte(`{"version":1,"id":"x"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := v.GetVolume(ctx, vol.ID); err == nil {
		t.Error("a damaged record read as a volume")
	}
	for _, err := range []error{v.DeleteVolume(ctx, vol.ID), v.DeleteSnapshot(ctx, "x")} {
		wantErr(t, err, ErrInvalid, "a change through a view")
	}
}
