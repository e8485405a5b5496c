package catalog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// View reads a storage root's volume records without owning its catalogue.
// On a shared root (one filesystem at the same path on every node) the
// controller owns the catalogue and the node plugins only stage what it
// made: a node reads a volume's record each time it needs it, since the
// owner may have changed it meanwhile, and a read sees one whole version
// because records are replaced by rename. A View takes no lock and writes
// nothing; the lock that keeps two nodes from serving one volume is the
// stack directory's, taken by whoever opens the stack for writing.
type View struct {
	root string
	vrec records
}

// OpenView opens the view of the storage root dir, an existing directory.
// Its catalogue's owner creates the layout, perhaps later than a node
// starts: until then Health fails and every volume is ErrNotFound.
func OpenView(dir string) (*View, error) {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir {
		return nil, fmt.Errorf("open storage root %q: the path must be absolute and clean: %w", dir, ErrInvalid)
	}
	if err := checkRoot(dir); err != nil {
		return nil, fmt.Errorf("open storage root: %w", err)
	}
	return &View{root: dir, vrec: records{dir: filepath.Join(dir, catalogDir, volumeRecordDir)}}, nil
}

func (v *View) check() error {
	if err := checkRoot(v.root); err != nil {
		return err
	}
	for _, d := range []string{v.vrec.dir, v.stacks()} {
		if err := checkDir(d); err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("%s is not a storage root yet (no %s): the controller creates its layout when it opens the catalogue: %w",
					v.root, d, ErrUnavailable)
			}
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
	}
	return nil
}

func (v *View) stacks() string { return filepath.Join(v.root, ploopDir, stacksDir) }

// Root is the storage root's path.
func (v *View) Root() string { return v.root }

// GetVolume reads a volume's record. As for Catalog.GetVolume, a malformed
// id is ErrInvalid and a volume that is not ready (being created or
// deleted, or gone) is ErrNotFound.
func (v *View) GetVolume(ctx context.Context, id string) (Volume, error) {
	if _, err := ParseVolumeID(id); err != nil {
		return Volume{}, fmt.Errorf("get volume: %w", err)
	}
	b, err := readFileLimited(v.vrec.path(id), maxRecordSize)
	if errors.Is(err, os.ErrNotExist) {
		return Volume{}, fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Volume{}, fmt.Errorf("volume %s: %w: %w", id, ErrUnavailable, err)
	}
	r, err := parseVolumeRecord(b, id)
	if err != nil {
		return Volume{}, fmt.Errorf("volume %s: %w", id, err)
	}
	if r.State != stateReady {
		return Volume{}, fmt.Errorf("volume %s is %s: %w", id, r.State, ErrNotFound)
	}
	return toVolume(r), nil
}

// VolumePath is where a ploop volume's stack lives. Only ploop volumes
// live on a shared root.
func (v *View) VolumePath(id string) (string, error) {
	typ, err := ParseVolumeID(id)
	if err != nil {
		return "", err
	}
	if typ != Ploop {
		return "", fmt.Errorf("volume %s: simfs volumes need a node's own root, and this one is shared: %w", id, ErrInvalid)
	}
	return filepath.Join(v.stacks(), id), nil
}

// Health fails while the root is missing, not yet a root, or full.
func (v *View) Health(ctx context.Context) error {
	if err := v.check(); err != nil {
		return fmt.Errorf("storage root: %w", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(v.root, &st); err != nil {
		return fmt.Errorf("storage root: statfs %s: %w: %w", v.root, ErrUnavailable, err)
	}
	if free := int64(st.Bavail) * st.Bsize; free < minFreeBytes {
		return fmt.Errorf("storage root %s is full (%d bytes free): %w", v.root, free, ErrUnavailable)
	}
	return nil
}

// errOwned answers what only the catalogue's owner does.
func (v *View) errOwned(op string) error {
	return fmt.Errorf("%s: the controller owns the shared storage root's catalogue; a node only stages its volumes: %w", op, ErrInvalid)
}

// The rest of the catalogue's methods, so that a View can stand where a
// Catalog does in a node plugin, which calls none of them.

func (v *View) CreateVolume(context.Context, VolumeRequest) (Volume, error) {
	return Volume{}, v.errOwned("create volume")
}
func (v *View) DeleteVolume(context.Context, string) error { return v.errOwned("delete volume") }
func (v *View) ExpandVolume(context.Context, string, int64, int64) (int64, bool, error) {
	return 0, false, v.errOwned("expand volume")
}
func (v *View) ListVolumes(context.Context, string, int) ([]Volume, string, error) {
	return nil, "", v.errOwned("list volumes")
}
func (v *View) CreateSnapshot(context.Context, string, string) (Snapshot, error) {
	return Snapshot{}, v.errOwned("create snapshot")
}
func (v *View) GetSnapshot(context.Context, string) (Snapshot, error) {
	return Snapshot{}, v.errOwned("get snapshot")
}
func (v *View) DeleteSnapshot(context.Context, string) error { return v.errOwned("delete snapshot") }
func (v *View) ListSnapshots(context.Context, SnapshotFilter, string, int) ([]Snapshot, string, error) {
	return nil, "", v.errOwned("list snapshots")
}
func (v *View) Capacity(context.Context, Type) (Capacity, error) {
	return Capacity{}, v.errOwned("capacity")
}

func (v *View) Condition(context.Context, string) (Condition, error) {
	return Condition{}, v.errOwned("volume condition")
}

// Tidy does nothing: the catalogue's owner runs pending merges.
func (v *View) Tidy(context.Context) error { return nil }
