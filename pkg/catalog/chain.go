package catalog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/flock"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// dispatch runs a ploop operation on volume id: online through the process
// that serves it, or, when nobody does, offline here.
func (c *Catalog) dispatch(ctx context.Context, id, op string, online func(Online) error, offline func() error) error {
	if err := checkStackDir(c.stackDir(id)); err != nil {
		return err
	}
	if on := c.online(); on != nil {
		err := online(on)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrNotAttached) {
			return fmt.Errorf("%s online: %w", op, err)
		}
	}
	return c.offline(id, op, offline)
}

// offline runs an offline ploop operation. A top delta that carries the
// in-use mark while nobody holds the stack's lock was left by a server that
// died: it is repaired, as the node does when it re-attaches, and the
// operation retried. A stack somebody holds fails with ErrInUse.
func (c *Catalog) offline(id, op string, fn func() error) error {
	err := fn()
	if !errors.Is(err, ploop.ErrInUse) {
		return err
	}
	dir := c.stackDir(id)
	rep, rerr := ploop.RepairStack(dir)
	if rerr != nil {
		return fmt.Errorf("%s: %w (repair: %w)", op, err, rerr)
	}
	c.logger().Info("repaired a stack that was not closed cleanly", "volume", id, "op", op, "report", rep.String())
	return fn()
}

// freeze takes a ploop snapshot of volume id (the caller holds its lock)
// and returns the GUID of the frozen delta. A chain at the ploop limit
// first merges a delta no snapshot needs, if there is one.
func (c *Catalog) freeze(ctx context.Context, id string) (string, error) {
	dir := c.stackDir(id)
	if err := checkStackDir(dir); err != nil {
		return "", err
	}
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return "", err
	}
	if chain := d.Chain(); len(chain) >= ploop.MaxChain {
		if err := c.makeRoom(ctx, id, chain); err != nil {
			return "", err
		}
	}
	var guid string
	err = c.dispatch(ctx, id, "snapshot",
		func(on Online) (err error) { guid, err = on.Snapshot(ctx, id); return err },
		func() (err error) { guid, err = ploop.Snapshot(dir); return err })
	if err != nil {
		return "", err
	}
	if !ploop.ValidGUID(guid) {
		return "", fmt.Errorf("snapshot of %s returned %q, not a GUID", id, guid)
	}
	return guid, nil
}

// makeRoom merges the highest delta of a full chain that no snapshot of
// the volume refers to (one a clone shares, say): the clone keeps its own
// link, and the volume's next delta takes a copy of its clusters.
func (c *Catalog) makeRoom(ctx context.Context, id string, chain []ploop.DescriptorImg) error {
	live := c.liveSnapshotGUIDs(id)
	for i := len(chain) - 2; i >= 0; i-- {
		g := chain[i].GUID
		if live[g] {
			continue
		}
		dir := c.stackDir(id)
		c.logger().Info("merging a delta to stay within the ploop chain limit", "volume", id, "guid", g, "depth", len(chain))
		return c.dispatch(ctx, id, "merge",
			func(on Online) error { return on.DeleteSnapshot(ctx, id, g) },
			func() error { return ploop.DeleteSnapshot(dir, g) })
	}
	return fmt.Errorf("volume %s has %d deltas, each one a snapshot (the ploop limit is %d): delete a snapshot of it first: %w",
		id, len(chain), ploop.MaxChain, ErrLimit)
}

// liveSnapshotGUIDs are the deltas of volume id that snapshots being made or
// kept were cloned from.
func (c *Catalog) liveSnapshotGUIDs(id string) map[string]bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	live := map[string]bool{}
	for _, s := range c.snaps {
		if s.SourceVolume == id && s.State != stateDeleting && s.GUID != "" {
			live[s.GUID] = true
		}
	}
	return live
}

// trimLocked shortens the chain of ploop volume id (the caller holds its
// lock) by merging, from the top down, every delta below the top that no
// live snapshot of the volume was cloned from and that either
//
//   - is listed as a pending merge (its snapshot was deleted: merged even
//     when later snapshots or clones still link it, which keeps the chain
//     as long as the number of live snapshots however many come and go; the
//     stacks that link it keep reading the same, see the package
//     documentation), or
//   - is linked by this stack alone (the clone made from it, or the
//     snapshot that an interrupted operation left, is gone), so the merge
//     frees the clusters the deltas above it overwrote.
//
// Merging copies the delta's clusters that the delta above it lacks, so
// it costs time in proportion to the data, as ploop's snapshot-delete does.
func (c *Catalog) trimLocked(ctx context.Context, id string) error {
	r, ok := c.volume(id)
	if !ok || r.State != stateReady || r.Type != Ploop {
		return nil
	}
	dir := c.stackDir(id)
	if err := checkStackDir(dir); err != nil {
		return fmt.Errorf("trim %s: %w", id, err)
	}
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return fmt.Errorf("trim %s: %w", id, err)
	}
	chain := d.Chain()
	live := c.liveSnapshotGUIDs(id)
	var todo []string
	for i := len(chain) - 2; i >= 0; i-- {
		im := chain[i]
		if live[im.GUID] {
			continue
		}
		links, err := linkCount(filepath.Join(dir, im.File))
		if slices.Contains(r.PendingMerges, im.GUID) || (err == nil && links == 1) {
			todo = append(todo, im.GUID)
		}
	}
	var mergeErr error
	merged := map[string]bool{}
	for _, g := range todo {
		err := c.dispatch(ctx, id, "merge",
			func(on Online) error { return on.DeleteSnapshot(ctx, id, g) },
			func() error { return ploop.DeleteSnapshot(dir, g) })
		if err != nil {
			mergeErr = fmt.Errorf("trim %s: merge %s: %w", id, g, err)
			break
		}
		merged[g] = true
		c.hook("trim-merged")
		c.logger().V(2).Info("merged a delta no snapshot needs", "volume", id, "guid", g)
	}
	inChain := map[string]bool{}
	for _, im := range chain {
		inChain[im.GUID] = !merged[im.GUID]
	}
	var keep []string
	for _, g := range r.PendingMerges {
		if inChain[g] {
			keep = append(keep, g)
		}
	}
	if !slices.Equal(keep, r.PendingMerges) {
		r.PendingMerges = keep
		if err := c.putVolume(r); err != nil {
			return errors.Join(mergeErr, err)
		}
	}
	return mergeErr
}

// trim takes the volume's lock and trims its chain.
func (c *Catalog) trim(ctx context.Context, id string) error {
	unlock, err := c.lockKey(ctx, c.volKey(id))
	if err != nil {
		return err
	}
	defer unlock()
	return c.trimLocked(ctx, id)
}

// trimSharing trims the ploop volumes whose stacks link any of files: a
// stack that was removed may have been the last other holder of one of
// their deltas. Failures are logged; Tidy retries them.
func (c *Catalog) trimSharing(ctx context.Context, files map[fileID]bool) {
	if len(files) == 0 {
		return
	}
	c.mu.Lock()
	var ids []string
	for id, r := range c.vols {
		if r.Type == Ploop && r.State == stateReady {
			ids = append(ids, id)
		}
	}
	c.mu.Unlock()
	slices.Sort(ids)
	for _, id := range ids {
		shares := false
		for f := range stackFiles(c.stackDir(id)) {
			if files[f] {
				shares = true
				break
			}
		}
		if !shares {
			continue
		}
		if err := c.trim(ctx, id); err != nil {
			c.logger().Error(err, "could not shorten a volume's chain; Tidy will retry", "volume", id)
		}
	}
}

// Tidy merges the deltas that no snapshot or clone needs any more in every
// ploop volume (see trimLocked): what deletions could not merge at once
// because the volume's node was unreachable, and what recovery after a
// crash left. It returns the failures; the rest is done.
func (c *Catalog) Tidy(ctx context.Context) error {
	c.mu.Lock()
	var ids []string
	for id, r := range c.vols {
		if r.Type == Ploop && r.State == stateReady {
			ids = append(ids, id)
		}
	}
	c.mu.Unlock()
	slices.Sort(ids)
	var errs []error
	for _, id := range ids {
		errs = append(errs, c.trim(ctx, id))
	}
	return classify(errors.Join(errs...))
}

// Compact gives the free space inside a ploop volume's top delta back to the
// root (online when attached). simfs volumes have nothing to compact.
func (c *Catalog) Compact(ctx context.Context, id string) error {
	typ, err := ParseVolumeID(id)
	if err != nil {
		return fmt.Errorf("compact: %w", err)
	}
	unlock, err := c.lockKey(ctx, c.volKey(id))
	if err != nil {
		return fmt.Errorf("compact %s: %w", id, err)
	}
	defer unlock()
	if r, ok := c.volume(id); !ok || r.State != stateReady {
		return fmt.Errorf("compact %s: %w", id, ErrNotFound)
	}
	if typ != Ploop {
		return nil
	}
	dir := c.stackDir(id)
	err = c.dispatch(ctx, id, "compact",
		func(on Online) error { return on.Compact(ctx, id) },
		func() error { _, err := ploop.CompactStack(dir); return err })
	if err != nil {
		return fmt.Errorf("compact %s: %w", id, classify(err))
	}
	return nil
}

// fileID identifies a file whatever its name: hard links share it.
type fileID struct{ dev, ino uint64 }

// stackFiles returns the regular files of a stack directory (empty when it
// cannot be read).
func stackFiles(dir string) map[fileID]bool {
	out := map[fileID]bool{}
	if !isRealDir(dir) {
		return out
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return out
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		if st, err := os.Lstat(filepath.Join(dir, e.Name())); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				out[fileID{uint64(sys.Dev), sys.Ino}] = true
			}
		}
	}
	return out
}

func linkCount(path string) (uint64, error) {
	st, err := os.Lstat(path)
	if err != nil {
		return 0, err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("stat %s: no link count", path)
	}
	return uint64(sys.Nlink), nil
}

// checkStackDir refuses to work on a stack directory that is not one: a
// symlink put in its place is never followed out of the root.
func checkStackDir(dir string) error {
	if !isRealDir(dir) {
		return fmt.Errorf("%s is not a stack directory (missing, or not a directory): %w", dir, ErrPrecondition)
	}
	return nil
}

// isRealDir reports whether path is a directory and not a symlink to one.
func isRealDir(path string) bool {
	st, err := os.Lstat(path)
	return err == nil && st.IsDir()
}

func openDirNoFollow(dir string) (*os.File, error) {
	return os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
}

// flockNB takes the exclusive lock pkg/ploop uses on stack directories.
func flockNB(f *os.File) error { return flock.Exclusive(f) }
