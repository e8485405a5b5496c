package catalog

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"unicode/utf8"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/ploop-csi/ploop-csi/pkg/flock"
	"github.com/ploop-csi/ploop-csi/pkg/keylock"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

// The layout under the storage root (see the package documentation).
const (
	catalogDir      = "catalog"
	volumeRecordDir = "volumes"
	snapRecordDir   = "snapshots"
	lockName        = "lock"
	ploopDir        = "ploop"
	stacksDir       = "volumes"
	snapStacksDir   = "snapshots"
	simfsDir        = "simfs"
)

const (
	// MaxSize bounds every volume (1 PiB): larger requests are mistakes.
	MaxSize = int64(1) << 50
	// maxBATEntries bounds a ploop volume's clusters: a stack keeps its
	// BAT in memory (4 bytes per cluster), so 2^24 clusters cost 64 MiB;
	// with the default 1 MiB clusters that is 16 TiB, larger volumes need a
	// larger clusterSize.
	maxBATEntries = int64(1) << 24
	// ploopUnit is the granularity of ploop volume sizes.
	ploopUnit = int64(1) << 20
	// DefaultSize is the size of a volume requested without one.
	DefaultSize = int64(1) << 30
	// maxNameLength bounds the names of volumes and snapshots.
	maxNameLength = 1024
	// maxMkfsOptions bounds the mkfsOptions parameter.
	maxMkfsOptions = 1024
	// minFreeBytes is the free space below which Health calls the root full.
	minFreeBytes = int64(16) << 20
)

// Options tune a Catalog. The zero value is the default.
type Options struct {
	// OvercommitRatio multiplies the root filesystem's size and free space
	// in what Capacity promises; 0 means 1.0 (no overcommit).
	OvercommitRatio float64
	// Online runs operations on attached ploop volumes. nil means no
	// volume is ever attached (ploopctl, a controller-only process).
	Online Online
	// DefaultSize is the size of a volume created without one; 0 means
	// DefaultSize.
	DefaultSize int64
	// Simfs tunes the simfs root the catalogue opens itself.
	Simfs simfs.Options
	// SimfsRoot, when set, is the storage root's simfs root (OpenSimfs),
	// opened once by a process that shares it with the node's
	// attachments: simfs.Open takes no lock, so two Roots on one directory
	// in one process would serialise nothing between them. The catalogue
	// uses it and leaves closing it to the caller. nil: the catalogue
	// opens its own on the first simfs request.
	SimfsRoot *simfs.Root

	// Set only by tests of this package.
	hook     func(point string) // called between the steps of every operation
	statfs   func(path string) (total, free int64, err error)
	openDirs func(dir string) (dirVolumes, error) // stands in for simfs.Open
}

// Catalog is the storage root's catalogue: the volumes and snapshots of both
// types, their names, parameters, content sources and capacity. It is safe
// for concurrent use. One process owns a root's catalogue at a time (a lock
// file enforces it).
type Catalog struct {
	root  string
	opts  Options
	ratio float64
	lock  *os.File
	vrec  records
	srec  records

	mu         sync.Mutex // guards the maps and reserved
	vols       map[string]*volumeRecord
	snaps      map[string]*snapshotRecord
	volByName  map[string]string // name → id, for records not being deleted
	snapByName map[string]string
	reserved   int64 // capacity promised to expansions in progress

	keys  keylock.Locks // per name, volume and snapshot
	capMu sync.Mutex    // makes a capacity check and its reservation one step

	simfsMu sync.Mutex
	simfs   dirVolumes
}

// Open opens the catalogue of the storage root dir: an absolute path of an
// existing, writable directory (not a symlink). It creates the layout,
// takes the root's lock, loads the records and finishes or undoes what a
// crash interrupted (see the package documentation): creations are rolled
// back, deletions completed. Merges left pending are not run here (the
// volume may be attached to a node that is not back yet); Tidy runs them.
func Open(dir string, opts Options) (*Catalog, error) {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir {
		return nil, fmt.Errorf("open storage root %q: the path must be absolute and clean: %w", dir, ErrInvalid)
	}
	ratio := opts.OvercommitRatio
	if ratio == 0 {
		ratio = 1
	}
	if !(ratio > 0) || math.IsInf(ratio, 0) || ratio > 1000 {
		return nil, fmt.Errorf("open storage root %s: overcommit ratio %v must be above 0 and at most 1000: %w", dir, opts.OvercommitRatio, ErrInvalid)
	}
	if opts.DefaultSize == 0 {
		opts.DefaultSize = DefaultSize
	}
	if opts.DefaultSize < 0 || opts.DefaultSize > MaxSize {
		return nil, fmt.Errorf("open storage root %s: default size %d: %w", dir, opts.DefaultSize, ErrInvalid)
	}
	if err := checkRoot(dir); err != nil {
		return nil, fmt.Errorf("open storage root: %w", err)
	}
	if r := opts.SimfsRoot; r != nil && r.Path() != simfsPath(dir) {
		return nil, fmt.Errorf("open storage root %s: the simfs root %s is not this root's %s: %w", dir, r.Path(), simfsPath(dir), ErrInvalid)
	}
	c := &Catalog{
		root: dir, opts: opts, ratio: ratio,
		vrec: records{dir: filepath.Join(dir, catalogDir, volumeRecordDir)},
		srec: records{dir: filepath.Join(dir, catalogDir, snapRecordDir)},
		vols: map[string]*volumeRecord{}, snaps: map[string]*snapshotRecord{},
		volByName: map[string]string{}, snapByName: map[string]string{},
	}
	for _, sub := range []string{catalogDir, c.vrec.dir, c.srec.dir, ploopDir, c.stacks(), c.snapStacks()} {
		p := sub
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, sub)
		}
		if err := os.Mkdir(p, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("open storage root %s: %w", dir, err)
		}
		if err := checkDir(p); err != nil {
			return nil, fmt.Errorf("open storage root %s: %w", dir, err)
		}
	}
	lock, err := os.OpenFile(filepath.Join(dir, catalogDir, lockName), os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open storage root %s: %w", dir, err)
	}
	if err := flock.Exclusive(lock); err != nil {
		lock.Close()
		return nil, fmt.Errorf("open storage root %s: %w: %w: %w", dir, ErrHeld, ErrUnavailable, err)
	}
	c.lock = lock
	if err := c.load(); err != nil {
		c.Close()
		return nil, fmt.Errorf("open storage root %s: %w", dir, err)
	}
	if err := c.recover(); err != nil {
		// What could not be finished stays recorded as it is: hidden from
		// lists, counted as provisioned, retried by the next request for
		// the same name or id and by the next Open.
		c.logger().Error(err, "could not finish every interrupted operation")
	}
	return c, nil
}

// checkRoot checks that dir is a writable directory and not a symlink.
func checkRoot(dir string) error {
	if err := checkDir(dir); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s does not exist: %w: %w", dir, ErrUnavailable, err)
		}
		return err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w: %w", dir, ErrUnavailable, err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return fmt.Errorf("%s is on a read-only filesystem: %w", dir, ErrUnavailable)
	}
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		return fmt.Errorf("%s is not writable: %w: %w", dir, ErrUnavailable, err)
	}
	return nil
}

// checkDir refuses anything but a real directory: the root and its
// subdirectories are never reached through a symlink.
func checkDir(p string) error {
	st, err := os.Lstat(p)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory (%s): %w", p, st.Mode().Type(), ErrInvalid)
	}
	return nil
}

// Close releases the root's lock. Operations must have returned.
func (c *Catalog) Close() error {
	c.simfsMu.Lock()
	if c.simfs != nil && c.opts.SimfsRoot == nil {
		c.simfs.Close()
	}
	c.simfs = nil
	c.simfsMu.Unlock()
	if c.lock != nil {
		err := c.lock.Close()
		c.lock = nil
		return err
	}
	return nil
}

// Root is the storage root directory.
func (c *Catalog) Root() string { return c.root }

func (c *Catalog) stacks() string              { return filepath.Join(c.root, ploopDir, stacksDir) }
func (c *Catalog) snapStacks() string          { return filepath.Join(c.root, ploopDir, snapStacksDir) }
func (c *Catalog) stackDir(id string) string   { return filepath.Join(c.stacks(), id) }
func (c *Catalog) snapDir(id string) string    { return filepath.Join(c.snapStacks(), id) }
func cloneTmpName(id string) string            { return "." + id + ".clone-tmp" }
func (c *Catalog) logger() klog.Logger         { return klog.Background().WithValues("root", c.root) }
func (c *Catalog) online() Online              { return c.opts.Online }
func (c *Catalog) volKey(id string) string     { return "volume/" + id }
func (c *Catalog) snapKey(id string) string    { return "snapshot/" + id }
func (c *Catalog) volNameKey(n string) string  { return "name/volume/" + n }
func (c *Catalog) snapNameKey(n string) string { return "name/snapshot/" + n }

// hook marks a step boundary for the crash tests.
func (c *Catalog) hook(point string) {
	if c.opts.hook != nil {
		c.opts.hook(point)
	}
}

// VolumePath is where a volume's data lives: the stack directory of a ploop
// volume, the directory of a simfs volume. The id is validated first.
func (c *Catalog) VolumePath(id string) (string, error) {
	typ, err := ParseVolumeID(id)
	if err != nil {
		return "", err
	}
	if r, ok := c.volume(id); !ok || r.State != stateReady {
		return "", fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	if typ == Ploop {
		return c.stackDir(id), nil
	}
	d, err := c.dirs()
	if err != nil {
		return "", err
	}
	return d.VolumePath(id)
}

// checkName validates the name of a volume or snapshot: it is not a path,
// but it is stored in JSON, so it must be valid UTF-8 to read back equal.
func checkName(what, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s name is empty: %w", what, ErrInvalid)
	case len(name) > maxNameLength:
		return fmt.Errorf("%s name is %d bytes long, more than %d: %w", what, len(name), maxNameLength, ErrInvalid)
	case !utf8.ValidString(name) || strings.ContainsRune(name, 0):
		return fmt.Errorf("%s name %q is not valid UTF-8 text: %w", what, name, ErrInvalid)
	}
	return nil
}

// load reads the records into the index.
func (c *Catalog) load() error {
	err := c.vrec.load(func(b []byte, id string) error {
		r, err := parseVolumeRecord(b, id)
		if err != nil {
			return err
		}
		c.vols[r.ID] = r
		return nil
	})
	if err != nil {
		return err
	}
	err = c.srec.load(func(b []byte, id string) error {
		r, err := parseSnapshotRecord(b, id)
		if err != nil {
			return err
		}
		c.snaps[r.ID] = r
		return nil
	})
	if err != nil {
		return err
	}
	for _, id := range sortedKeys(c.vols) {
		r := c.vols[id]
		if r.State == stateDeleting {
			continue
		}
		if other, ok := c.volByName[r.Name]; ok {
			return fmt.Errorf("volumes %s and %s have the same name %q", other, id, r.Name)
		}
		c.volByName[r.Name] = id
	}
	for _, id := range sortedKeys(c.snaps) {
		r := c.snaps[id]
		if r.State == stateDeleting {
			continue
		}
		if other, ok := c.snapByName[r.Name]; ok {
			return fmt.Errorf("snapshots %s and %s have the same name %q", other, id, r.Name)
		}
		c.snapByName[r.Name] = id
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// The index holds copies: callers change a copy and store it with put*, so
// a reader never sees a record half changed.

func (c *Catalog) volume(id string) (*volumeRecord, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.vols[id]
	if !ok {
		return nil, false
	}
	cp := *r
	cp.PendingMerges = append([]string(nil), r.PendingMerges...)
	return &cp, true
}

func (c *Catalog) snapshot(id string) (*snapshotRecord, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.snaps[id]
	if !ok {
		return nil, false
	}
	cp := *r
	return &cp, true
}

// putVolume writes the record, then indexes a copy of it.
func (c *Catalog) putVolume(r *volumeRecord) error {
	r.Version = recordVersion
	if err := c.vrec.write(r.ID, r); err != nil {
		return err
	}
	cp := *r
	cp.PendingMerges = append([]string(nil), r.PendingMerges...)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.vols[r.ID] = &cp
	if r.State == stateDeleting {
		if c.volByName[r.Name] == r.ID {
			delete(c.volByName, r.Name)
		}
	} else {
		c.volByName[r.Name] = r.ID
	}
	return nil
}

func (c *Catalog) dropVolume(id string) error {
	if err := c.vrec.remove(id); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if r, ok := c.vols[id]; ok && c.volByName[r.Name] == id {
		delete(c.volByName, r.Name)
	}
	delete(c.vols, id)
	return nil
}

func (c *Catalog) putSnapshot(r *snapshotRecord) error {
	r.Version = recordVersion
	if err := c.srec.write(r.ID, r); err != nil {
		return err
	}
	cp := *r
	c.mu.Lock()
	defer c.mu.Unlock()
	c.snaps[r.ID] = &cp
	if r.State == stateDeleting {
		if c.snapByName[r.Name] == r.ID {
			delete(c.snapByName, r.Name)
		}
	} else {
		c.snapByName[r.Name] = r.ID
	}
	return nil
}

func (c *Catalog) dropSnapshot(id string) error {
	if err := c.srec.remove(id); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if r, ok := c.snaps[id]; ok && c.snapByName[r.Name] == id {
		delete(c.snapByName, r.Name)
	}
	delete(c.snaps, id)
	return nil
}

// recover finishes deletions and undoes creations that a crash
// interrupted, removes leftovers no record accounts for, and brings recorded
// sizes up to interrupted expansions. It runs in Open, before any request.
func (c *Catalog) recover() error {
	ctx := context.Background()
	log := c.logger()
	var errs []error
	for _, id := range sortedKeys(c.vols) {
		r, _ := c.volume(id)
		switch r.State {
		case stateCreating:
			log.Info("rolling back a volume whose creation was interrupted", "volume", id, "name", r.Name)
			errs = append(errs, c.rollbackVolume(r))
		case stateDeleting:
			log.Info("finishing an interrupted volume deletion", "volume", id)
			errs = append(errs, c.finishDeleteVolume(r))
		}
	}
	for _, id := range sortedKeys(c.snaps) {
		r, _ := c.snapshot(id)
		switch r.State {
		case stateCreating:
			log.Info("rolling back a snapshot whose creation was interrupted", "snapshot", id, "name", r.Name)
			errs = append(errs, c.rollbackSnapshot(ctx, r, false))
		case stateDeleting:
			log.Info("finishing an interrupted snapshot deletion", "snapshot", id)
			errs = append(errs, c.finishDeleteSnapshot(r))
		}
	}
	errs = append(errs, c.removeStrays(c.stacks(), func(id string) bool { _, ok := c.volume(id); return ok }, true))
	errs = append(errs, c.removeStrays(c.snapStacks(), func(id string) bool { _, ok := c.snapshot(id); return ok }, false))
	for _, id := range sortedKeys(c.vols) {
		r, _ := c.volume(id)
		if r.Type != Ploop || r.State != stateReady {
			continue
		}
		d, err := ploop.ReadDescriptor(c.stackDir(id))
		if err != nil || d.Size() <= r.Size {
			continue // Condition reports a stack that cannot be read
		}
		log.Info("recording the size of an interrupted expansion", "volume", id, "recorded", r.Size, "stack", d.Size())
		r.Size = d.Size()
		errs = append(errs, c.putVolume(r))
	}
	return errors.Join(errs...)
}

// removeStrays removes from dir the entries shaped like this catalogue's
// stacks (and pkg/ploop's clone temporaries of them) that no record
// accounts for. Records are written before data and removed after it, so
// such entries can only be leftovers; anything else is left alone and
// logged.
func (c *Catalog) removeStrays(dir string, known func(id string) bool, volumes bool) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		name := e.Name()
		id := name
		if inner, ok := strings.CutPrefix(name, "."); ok {
			id, _ = strings.CutSuffix(inner, ".clone-tmp")
		}
		var shaped bool
		if volumes {
			typ, err := ParseVolumeID(id)
			shaped = err == nil && typ == Ploop
		} else {
			shaped = ValidateSnapshotID(id) == nil
		}
		if !shaped {
			c.logger().Info("leaving an unknown entry in the storage root alone", "path", filepath.Join(dir, name))
			continue
		}
		if name == id && known(id) {
			continue
		}
		c.logger().Info("removing a leftover of an interrupted operation", "path", filepath.Join(dir, name))
		if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := syncDir(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeStack removes a stack directory and any clone temporary of it. The
// hard-linked deltas other directories share stay alive through their
// links. os.RemoveAll unlinks symlinks, it never follows them.
func removeStack(dir string) error {
	parent, base := filepath.Split(dir)
	for _, p := range []string{dir, filepath.Join(parent, cloneTmpName(base))} {
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("remove %s: %w", p, err)
		}
	}
	if err := syncDir(parent); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// lockKey serialises the operations on one name, volume or snapshot while
// operations on others (long merges, copies) run in parallel; it fails
// with ErrBusy once ctx ends before the key is free.
func (c *Catalog) lockKey(ctx context.Context, key string) (func(), error) {
	unlock, err := c.keys.Lock(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("waiting for %s: %w: %w", key, ErrBusy, err)
	}
	return unlock, nil
}
