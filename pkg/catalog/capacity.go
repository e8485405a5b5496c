package catalog

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// Capacity is what the storage root can still promise.
type Capacity struct {
	// TotalBytes is the size of the root's filesystem, FreeBytes what
	// unprivileged writers can still write to it.
	TotalBytes, FreeBytes int64
	// Ratio is the overcommit ratio.
	Ratio float64
	// ProvisionedBytes is the sum of the sizes of all volumes of both
	// types (and of expansions in progress).
	ProvisionedBytes int64
	// AvailableBytes is what can still be promised: TotalBytes × Ratio −
	// ProvisionedBytes, never more than FreeBytes × Ratio, never negative;
	// 0 when Refused is set.
	AvailableBytes int64
	// Refused, when set, says why no volume of the type asked for can be
	// created on this root at all (simfs without project quota).
	Refused error
}

func (c Capacity) String() string {
	return fmt.Sprintf("filesystem %d bytes, %d free, overcommit ratio %g, %d provisioned", c.TotalBytes, c.FreeBytes, c.Ratio, c.ProvisionedBytes)
}

func (c *Catalog) statfs() (total, free int64, err error) {
	if c.opts.statfs != nil {
		return c.opts.statfs(c.root)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(c.root, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %s: %w: %w", c.root, ErrUnavailable, err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
}

// capacity computes Capacity from the filesystem and the index.
func (c *Catalog) capacity() (Capacity, error) {
	total, free, err := c.statfs()
	if err != nil {
		return Capacity{}, err
	}
	c.mu.Lock()
	prov := c.reserved
	for _, r := range c.vols {
		prov += r.Size
	}
	c.mu.Unlock()
	avail := math.Min(float64(total)*c.ratio-float64(prov), float64(free)*c.ratio)
	switch {
	case !(avail > 0):
		avail = 0
	case avail >= math.MaxInt64:
		avail = math.MaxInt64
	}
	return Capacity{TotalBytes: total, FreeBytes: free, Ratio: c.ratio, ProvisionedBytes: prov, AvailableBytes: int64(avail)}, nil
}

// Capacity reports what the root can still promise to volumes of type typ
// (GetCapacity); "" means volumes of any type. A root that could not
// create a single volume of the type promises nothing, so that a scheduler
// picks another node: simfs volumes need project quota enforced, and
// without it every creation fails.
func (c *Catalog) Capacity(ctx context.Context, typ Type) (Capacity, error) {
	switch typ {
	case "", Ploop, Simfs:
	default:
		return Capacity{}, fmt.Errorf("capacity: type %q is not %s or %s: %w", typ, Ploop, Simfs, ErrInvalid)
	}
	capa, err := c.capacity()
	if err != nil {
		return Capacity{}, fmt.Errorf("capacity: %w", err)
	}
	if typ == Simfs {
		d, err := c.dirs()
		if err == nil {
			err = needQuota(d)
		}
		if err != nil {
			capa.AvailableBytes, capa.Refused = 0, err
		}
	}
	return capa, nil
}

// reserve promises n more bytes (an expansion in progress) if the root can.
func (c *Catalog) reserve(n int64) (func(), error) {
	c.capMu.Lock()
	defer c.capMu.Unlock()
	capa, err := c.capacity()
	if err != nil {
		return nil, err
	}
	if n > capa.AvailableBytes {
		return nil, fmt.Errorf("%d more bytes requested, %d can still be promised (%s): %w", n, capa.AvailableBytes, capa, ErrNoSpace)
	}
	c.mu.Lock()
	c.reserved += n
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		c.reserved -= n
		c.mu.Unlock()
	}, nil
}

// Usage is what one volume was promised and what it occupies.
type Usage struct {
	ProvisionedBytes int64
	// AllocatedBytes is the space its data occupies on the root: for ploop
	// the allocated blocks (st_blocks) of every delta of its chain,
	// including deltas it shares with snapshots and clones; for simfs the
	// quota's usage.
	AllocatedBytes int64
	// ExclusiveBytes is the part of AllocatedBytes that no other stack
	// shares: what deleting the volume would free.
	ExclusiveBytes int64
}

// VolumeUsage reports a volume's provisioned and allocated bytes.
func (c *Catalog) VolumeUsage(ctx context.Context, id string) (Usage, error) {
	typ, err := ParseVolumeID(id)
	if err != nil {
		return Usage{}, fmt.Errorf("usage: %w", err)
	}
	r, ok := c.volume(id)
	if !ok || r.State != stateReady {
		return Usage{}, fmt.Errorf("usage of %s: %w", id, ErrNotFound)
	}
	u := Usage{ProvisionedBytes: r.Size}
	if typ == Simfs {
		d, err := c.dirs()
		if err != nil {
			return Usage{}, fmt.Errorf("usage of %s: %w", id, err)
		}
		q, err := d.Usage(id)
		if err != nil {
			return Usage{}, fmt.Errorf("usage of %s: %w", id, classify(err))
		}
		u.AllocatedBytes, u.ExclusiveBytes = int64(q.Bytes), int64(q.Bytes)
		return u, nil
	}
	dir := c.stackDir(id)
	if err := checkStackDir(dir); err != nil {
		return Usage{}, fmt.Errorf("usage of %s: %w", id, err)
	}
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return Usage{}, fmt.Errorf("usage of %s: %w", id, err)
	}
	for _, im := range d.Chain() {
		st, err := os.Lstat(filepath.Join(dir, im.File))
		if err != nil {
			return Usage{}, fmt.Errorf("usage of %s: %w", id, err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		u.AllocatedBytes += sys.Blocks * 512
		if sys.Nlink == 1 {
			u.ExclusiveBytes += sys.Blocks * 512
		}
	}
	return u, nil
}

// RootUsage is the whole root: its capacity and what its data occupies.
type RootUsage struct {
	Capacity
	// AllocatedBytes is the space the volumes and snapshots of both types
	// occupy, each file counted once however many stacks link it.
	AllocatedBytes     int64
	Volumes, Snapshots int
}

// RootUsage reports the root's capacity, allocation and object counts.
func (c *Catalog) RootUsage(ctx context.Context) (RootUsage, error) {
	capa, err := c.capacity()
	if err != nil {
		return RootUsage{}, fmt.Errorf("root usage: %w", err)
	}
	ru := RootUsage{Capacity: capa}
	seen := map[fileID]bool{}
	for _, parent := range []string{c.stacks(), c.snapStacks()} {
		ents, err := os.ReadDir(parent)
		if err != nil {
			return RootUsage{}, fmt.Errorf("root usage: %w", err)
		}
		for _, e := range ents {
			if !e.IsDir() {
				continue
			}
			dir := filepath.Join(parent, e.Name())
			files, err := os.ReadDir(dir)
			if err != nil {
				continue // removed meanwhile
			}
			for _, f := range files {
				st, err := os.Lstat(filepath.Join(dir, f.Name()))
				if err != nil || !st.Mode().IsRegular() {
					continue
				}
				sys := st.Sys().(*syscall.Stat_t)
				id := fileID{uint64(sys.Dev), sys.Ino}
				if !seen[id] {
					seen[id] = true
					ru.AllocatedBytes += sys.Blocks * 512
				}
			}
		}
	}
	c.mu.Lock()
	var simVols, simSnaps []string
	for id, r := range c.vols {
		if r.State == stateReady {
			ru.Volumes++
			if r.Type == Simfs {
				simVols = append(simVols, id)
			}
		}
	}
	for id, r := range c.snaps {
		if r.State == stateReady {
			ru.Snapshots++
			if r.Type == Simfs {
				simSnaps = append(simSnaps, id)
			}
		}
	}
	c.mu.Unlock()
	if len(simVols)+len(simSnaps) > 0 {
		d, err := c.dirs()
		if err != nil {
			return RootUsage{}, fmt.Errorf("root usage: %w", err)
		}
		for _, id := range simVols {
			if q, err := d.Usage(id); err == nil {
				ru.AllocatedBytes += int64(q.Bytes)
			}
		}
		for _, id := range simSnaps {
			if s, err := d.GetSnapshot(id); err == nil {
				ru.AllocatedBytes += int64(s.UsedBytes)
			}
		}
	}
	return ru, nil
}

// Health reports why the root cannot take requests (nil when it can): it is
// missing, not a directory, read-only, or full.
func (c *Catalog) Health(ctx context.Context) error {
	if err := checkRoot(c.root); err != nil {
		return fmt.Errorf("storage root: %w", err)
	}
	for _, d := range []string{c.vrec.dir, c.srec.dir, c.stacks(), c.snapStacks()} {
		if err := checkDir(d); err != nil {
			return fmt.Errorf("storage root: %w: %w", ErrUnavailable, err)
		}
	}
	_, free, err := c.statfs()
	if err != nil {
		return fmt.Errorf("storage root: %w", err)
	}
	if free < minFreeBytes {
		return fmt.Errorf("storage root %s is full (%d bytes free): %w", c.root, free, ErrUnavailable)
	}
	// A filesystem that aborted (ext4 errors=remount-ro) shows no
	// read-only flag to statfs or access(2): only a write tells.
	if err := probeWrite(c.vrec.dir); err != nil {
		return fmt.Errorf("storage root %s cannot be written: %w: %w", c.root, ErrUnavailable, err)
	}
	return nil
}

// probeWrite creates, syncs and removes a file in the records directory
// dir, named like an interrupted record write so that a leftover is
// cleaned up at the next Open.
func probeWrite(dir string) error {
	f, err := os.CreateTemp(dir, ".probe-*"+recordSuffix+tmpSuffix)
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write([]byte("probe")); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Condition is a volume's health as the controller sees it.
type Condition struct {
	Abnormal bool
	// Message says what is wrong and what to do about it.
	Message string
}

// Condition checks a volume's data: for ploop, that the stack and every
// delta of its chain are there and consistent, and that the top delta does
// not carry the in-use mark while the volume is not attached (a server
// died: the image needs repair); for simfs, that the directory and its
// quota are there.
func (c *Catalog) Condition(ctx context.Context, id string) (Condition, error) {
	typ, err := ParseVolumeID(id)
	if err != nil {
		return Condition{}, fmt.Errorf("condition: %w", err)
	}
	r, ok := c.volume(id)
	if !ok || r.State != stateReady {
		return Condition{}, fmt.Errorf("condition of %s: %w", id, ErrNotFound)
	}
	bad := func(format string, args ...any) (Condition, error) {
		return Condition{Abnormal: true, Message: fmt.Sprintf(format, args...)}, nil
	}
	if typ == Simfs {
		d, err := c.dirs()
		if err != nil {
			return bad("the simfs root cannot be opened: %v", err)
		}
		if err := d.QuotaEnforced(); err != nil {
			return bad("project quota is not enforced on the storage root, so the volume has no size limit: %v", err)
		}
		if _, err := d.Usage(id); err != nil {
			return bad("the volume's directory or quota is missing: %v", err)
		}
		return Condition{Message: "volume is healthy"}, nil
	}
	dir := c.stackDir(id)
	if err := checkStackDir(dir); err != nil {
		return bad("%v; restore the volume from a snapshot or a backup", err)
	}
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return bad("the volume's stack %s cannot be read (%v); restore the volume from a snapshot or a backup", dir, err)
	}
	attached := false
	if on := c.online(); on != nil {
		a, err := on.Attached(ctx, id)
		if err != nil && !errors.Is(err, ErrNotAttached) {
			return Condition{}, fmt.Errorf("condition of %s: ask whether it is attached: %w", id, err)
		}
		attached = a
	}
	chain := d.Chain()
	for i, im := range chain {
		path := filepath.Join(dir, im.File)
		if _, err := os.Lstat(path); err != nil {
			return bad("delta %s of the volume's chain is missing (%v); its data cannot be read", path, err)
		}
		if im.Type != ploop.TypeCompressed {
			continue
		}
		if i == len(chain)-1 && attached {
			continue // being written: only the process serving it can judge it
		}
		info, err := ploop.Inspect(path)
		if err != nil {
			return bad("delta %s cannot be read: %v; run `ploopctl check --repair %s` while the volume is not attached", path, err, dir)
		}
		if info.InUse {
			return bad("delta %s was not closed cleanly (a server stopped while serving it); it is repaired when the volume is next staged, or run `ploopctl check --repair %s` while it is not attached", path, dir)
		}
		if info.Problems > 0 {
			return bad("delta %s has %d problems; run `ploopctl check %s` to see them and `ploopctl check --repair %s` while the volume is not attached", path, info.Problems, dir, dir)
		}
	}
	return Condition{Message: "volume is healthy"}, nil
}
