package simfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/ploop-csi/ploop-csi/pkg/keylock"
)

const (
	metaDir      = ".simfs"
	registryFile = "registry.json"
	lockFile     = "lock"
	volumesDir   = "volumes"
	snapshotsDir = "snapshots"
	tmpPrefix    = ".tmp-"

	// DefaultFirstProjectID is where allocation starts: well above the IDs
	// people pick by hand and above the range kubelet's own fsquota uses first.
	DefaultFirstProjectID = uint32(1) << 24
)

// Options tunes a Root. The zero value is the default.
type Options struct {
	// FirstProjectID is the lowest project ID a fresh root allocates.
	FirstProjectID uint32
}

// Root is an open simfs storage root. It is safe for concurrent use; distinct
// processes sharing a root serialise registry updates with a file lock, and
// all roots on one filesystem serialise project-ID allocation with a lock file
// at the filesystem's root.
type Root struct {
	path      string
	fd        int      // the root directory
	volumes   *os.File // root/volumes
	snapshots *os.File // root/snapshots
	lock      *os.File // root/.simfs/lock, flocked around registry updates
	quota     quotaFS
	first     uint32
	plock     projectLock // filesystem-wide, around project-ID allocation

	mu  sync.Mutex // in-process half of the registry lock
	ids keylock.Locks
}

// Volume describes one directory volume.
type Volume struct {
	ID      string
	Path    string // the directory to bind-mount into a pod
	Project uint32
	Bytes   uint64 // byte hard limit
	Inodes  uint64 // inode hard limit
	Source  string // snapshot the volume was restored from, if any
}

// Usage is a volume's consumption and limits as the quota reports them.
type Usage struct {
	Bytes, Inodes           uint64
	BytesLimit, InodesLimit uint64
}

// Snapshot describes a copy of a volume's tree.
type Snapshot struct {
	ID                    string
	Source                string
	Bytes, Inodes         uint64 // the source's limits at snapshot time
	UsedBytes, UsedInodes uint64 // what the copied tree occupied
	Created               time.Time
}

// Open opens the storage root at path (an absolute, clean path of an existing
// directory that is not a symlink), creating simfs's directories in it. It
// succeeds on filesystems without project quota so that existing volumes
// and snapshots stay manageable; QuotaEnforced reports the state and Create
// and Restore refuse to run without enforcement.
func Open(path string, opts Options) (*Root, error) {
	return open(path, opts, nil, "")
}

// open is Open with the kernel's quota replaced by q and the filesystem's
// root (where the allocation lock lives) by fsRoot, when they are set.
func open(path string, opts Options, q quotaFS, fsRoot string) (*Root, error) {
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return nil, fmt.Errorf("open simfs root %q: path must be absolute and clean: %w", path, ErrInvalid)
	}
	fd, err := unix.Open(path, openDirFlags, 0)
	if err != nil {
		return nil, fmt.Errorf("open simfs root %s: %w", path, err)
	}
	r := &Root{path: path, fd: fd, quota: q, first: opts.FirstProjectID}
	r.plock.fsRoot = fsRoot
	if r.first == 0 {
		r.first = DefaultFirstProjectID
	}
	if err := r.init(); err != nil {
		r.Close()
		return nil, fmt.Errorf("open simfs root %s: %w", path, err)
	}
	return r, nil
}

func (r *Root) init() error {
	st, err := fstatEntry(r.fd)
	if err != nil {
		return err
	}
	r.plock.dev = st.dev
	if r.quota == nil {
		kq, err := newKernelQuota(r.fd)
		if err != nil {
			return err
		}
		r.quota = kq
	}
	sub := func(name string) (*os.File, error) {
		if err := unix.Mkdirat(r.fd, name, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("mkdir %s: %w", name, err)
		}
		fd, err := unix.Openat(r.fd, name, openDirFlags, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", name, err)
		}
		f := os.NewFile(uintptr(fd), filepath.Join(r.path, name))
		got, err := fstatEntry(fd)
		if err != nil {
			f.Close()
			return nil, err
		}
		if got.mntID != st.mntID {
			f.Close()
			return nil, fmt.Errorf("%s is a different mount from the root: %w", name, unix.EXDEV)
		}
		return f, nil
	}
	meta, err := sub(metaDir)
	if err != nil {
		return err
	}
	defer meta.Close()
	lfd, err := unix.Openat(int(meta.Fd()), lockFile, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("open lock file: %w", err)
	}
	r.lock = os.NewFile(uintptr(lfd), lockFile)
	if r.volumes, err = sub(volumesDir); err != nil {
		return err
	}
	if r.snapshots, err = sub(snapshotsDir); err != nil {
		return err
	}
	// Load once so that a damaged registry fails Open, not a later request.
	return r.view(func(*registry) error { return nil })
}

// Close releases the root's file descriptors.
func (r *Root) Close() error {
	for _, f := range []*os.File{r.volumes, r.snapshots, r.lock} {
		if f != nil {
			f.Close()
		}
	}
	return unix.Close(r.fd)
}

// Path is the root directory.
func (r *Root) Path() string { return r.path }

// VolumePath is the directory of volume id (whether or not it exists).
func (r *Root) VolumePath(id string) (string, error) {
	if err := ValidateID(id); err != nil {
		return "", err
	}
	return filepath.Join(r.path, volumesDir, id), nil
}

// QuotaEnforced returns nil when the root's filesystem enforces project quota.
func (r *Root) QuotaEnforced() error { return r.quota.enforced() }

// update runs fn on the current registry under the in-process and the
// cross-process lock and saves the registry when fn reports a change.
func (r *Root) update(fn func(reg *registry) (changed bool, err error)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := unix.Flock(int(r.lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock registry: %w", err)
	}
	defer unix.Flock(int(r.lock.Fd()), unix.LOCK_UN)
	dir := filepath.Join(r.path, metaDir)
	reg, err := loadRegistry(dir, r.first)
	if err != nil {
		return err
	}
	changed, err := fn(reg)
	if err != nil {
		return err
	}
	if changed {
		return saveRegistry(dir, reg)
	}
	return nil
}

func (r *Root) view(fn func(reg *registry) error) error {
	return r.update(func(reg *registry) (bool, error) { return false, fn(reg) })
}

func (r *Root) volume(id string, v *volumeRecord) Volume {
	return Volume{ID: id, Path: filepath.Join(r.path, volumesDir, id), Project: v.Project,
		Bytes: v.Bytes, Inodes: v.Inodes, Source: v.Source}
}

// Create makes volume id with a byte and an inode hard limit (bytes rounded
// up to 4 KiB). Repeating a Create with the same limits returns the existing
// volume (finishing it if an earlier attempt was interrupted); the same id
// with other limits, or a volume restored from a snapshot, is ErrExists.
func (r *Root) Create(id string, bytes, inodes uint64) (Volume, error) {
	v, err := r.create(id, bytes, inodes, "")
	if err != nil {
		return Volume{}, fmt.Errorf("create volume %q: %w", id, err)
	}
	return v, nil
}

func (r *Root) create(id string, bytes, inodes uint64, source string) (Volume, error) {
	if err := ValidateID(id); err != nil {
		return Volume{}, err
	}
	bytes, err := validateLimits(bytes, inodes)
	if err != nil {
		return Volume{}, err
	}
	if err := r.quota.enforced(); err != nil {
		return Volume{}, err
	}
	defer r.lockID("volume/" + id)()
	var rec volumeRecord
	err = r.update(func(reg *registry) (bool, error) {
		if v, ok := reg.Volumes[id]; ok {
			if v.Bytes != bytes || v.Inodes != inodes || v.Source != source {
				return false, fmt.Errorf("volume exists with %d bytes, %d inodes, source %q; requested %d bytes, %d inodes, source %q: %w",
					v.Bytes, v.Inodes, v.Source, bytes, inodes, source, ErrExists)
			}
			rec = *v
			return false, nil
		}
		p, err := r.claimProject(reg, bytes, inodes)
		if err != nil {
			return false, err
		}
		rec = volumeRecord{Project: p, Bytes: bytes, Inodes: inodes, Source: source}
		reg.Volumes[id] = &rec
		return true, nil
	})
	if err != nil {
		return Volume{}, err
	}
	if rec.Ready {
		return r.volume(id, &rec), nil
	}
	if source != "" {
		// An interrupted restore left an unknown part of the tree: start over.
		if err := removeTree(int(r.volumes.Fd()), id); err != nil {
			return Volume{}, err
		}
	}
	if err := r.makeVolumeDir(id, &rec); err != nil {
		return Volume{}, err
	}
	if source != "" {
		if err := r.restoreInto(source, id); err != nil {
			return Volume{}, err
		}
	}
	err = r.update(func(reg *registry) (bool, error) {
		v, ok := reg.Volumes[id]
		if !ok || v.Project != rec.Project {
			return false, fmt.Errorf("registry entry changed while the volume was made: %w", ErrConflict)
		}
		v.Ready = true
		return true, nil
	})
	if err != nil {
		return Volume{}, err
	}
	klog.V(2).InfoS("simfs volume created", "root", r.path, "volume", id, "project", rec.Project, "bytes", bytes, "inodes", inodes, "source", source)
	return r.volume(id, &rec), nil
}

// claimProject allocates a project ID for a volume with the given limits and
// sets those limits before the caller records the ID. Other roots on the
// filesystem learn of the ID only from the quota, which lists IDs with limits
// or usage; so the choice and the limits happen under the filesystem-wide
// lock, and the ID is never in a registry without being visible in the quota.
// A crash after the limits are set and before the registry is saved leaks the
// ID (nobody allocates it again), which is harmless.
func (r *Root) claimProject(reg *registry, bytes, inodes uint64) (uint32, error) {
	unlock, err := r.plock.lock(r.path)
	if err != nil {
		return 0, err
	}
	defer unlock()
	p, err := r.allocate(reg)
	if err != nil {
		return 0, err
	}
	if err := r.quota.setLimits(p, bytes, inodes); err != nil {
		return 0, fmt.Errorf("claim project ID %d: %w", p, err)
	}
	return p, nil
}

// allocate picks the next project ID that no recorded volume, no existing
// volume directory and nothing the quota already accounts for uses, and
// advances the counter past it.
func (r *Root) allocate(reg *registry) (uint32, error) {
	used, err := r.quota.usedProjects()
	if err != nil {
		return 0, err
	}
	if err := r.scanVolumeProjects(used); err != nil {
		return 0, err
	}
	for _, v := range reg.Volumes {
		used[v.Project] = true
	}
	for p := reg.NextProject; p != 0 && p != ^uint32(0); p++ {
		if !used[p] {
			reg.NextProject = p + 1
			return p, nil
		}
	}
	return 0, fmt.Errorf("no free project ID at or above %d: %w", reg.NextProject, unix.ENOSPC)
}

func (r *Root) scanVolumeProjects(used map[uint32]bool) error {
	names, err := readNames(int(r.volumes.Fd()))
	if err != nil {
		return fmt.Errorf("scan volumes: %w", err)
	}
	for _, n := range names {
		fd, err := unix.Openat(int(r.volumes.Fd()), n, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) {
			continue
		}
		if err != nil {
			return fmt.Errorf("scan volumes: open %s: %w", n, err)
		}
		p, err := r.quota.project(fd)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("scan volumes: %s: %w", n, err)
		}
		used[p] = true
	}
	return nil
}

// readNames lists an open directory from its start without consuming the
// caller's file offset.
func readNames(dirfd int) ([]string, error) {
	fd, err := unix.Openat(dirfd, ".", openDirFlags, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), ".")
	defer f.Close()
	return f.Readdirnames(-1)
}

// makeVolumeDir creates (or completes) the directory of a volume: project ID
// with inheritance, then the limits.
func (r *Root) makeVolumeDir(id string, rec *volumeRecord) error {
	made := true
	if err := unix.Mkdirat(int(r.volumes.Fd()), id, 0o700); errors.Is(err, unix.EEXIST) {
		made = false
	} else if err != nil {
		return fmt.Errorf("mkdir: %w", err)
	}
	fd, err := unix.Openat(int(r.volumes.Fd()), id, openDirFlags, 0)
	if err != nil {
		return fmt.Errorf("open volume directory: %w", err)
	}
	defer unix.Close(fd)
	if made {
		// Writable by any pod user: ownership is the pod's business (fsGroup).
		if err := unix.Fchmod(fd, 0o777); err != nil {
			return fmt.Errorf("chmod volume directory: %w", err)
		}
	}
	if err := r.quota.setProject(fd, rec.Project); err != nil {
		return fmt.Errorf("set project ID %d: %w", rec.Project, err)
	}
	return r.quota.setLimits(rec.Project, rec.Bytes, rec.Inodes)
}

// Expand raises a volume's limits online. inodes 0 keeps the inode limit.
// Lowering a limit is ErrConflict; repeating an Expand is harmless.
func (r *Root) Expand(id string, bytes, inodes uint64) (Volume, error) {
	v, err := r.expand(id, bytes, inodes)
	if err != nil {
		return Volume{}, fmt.Errorf("expand volume %q: %w", id, err)
	}
	return v, nil
}

func (r *Root) expand(id string, bytes, inodes uint64) (Volume, error) {
	if err := ValidateID(id); err != nil {
		return Volume{}, err
	}
	checkInodes := inodes
	if checkInodes == 0 {
		checkInodes = 1
	}
	bytes, err := validateLimits(bytes, checkInodes)
	if err != nil {
		return Volume{}, err
	}
	defer r.lockID("volume/" + id)()
	var rec volumeRecord
	if err := r.view(func(reg *registry) error {
		v, ok := reg.Volumes[id]
		if !ok || !v.Ready {
			return ErrNotFound
		}
		rec = *v
		return nil
	}); err != nil {
		return Volume{}, err
	}
	if inodes == 0 {
		inodes = rec.Inodes
	}
	if bytes < rec.Bytes || inodes < rec.Inodes {
		return Volume{}, fmt.Errorf("cannot shrink from %d bytes, %d inodes to %d bytes, %d inodes: %w",
			rec.Bytes, rec.Inodes, bytes, inodes, ErrConflict)
	}
	// Kernel first: a crash in between leaves the registry lower than the
	// kernel, and the retried Expand sets both again.
	if err := r.quota.setLimits(rec.Project, bytes, inodes); err != nil {
		return Volume{}, err
	}
	err = r.update(func(reg *registry) (bool, error) {
		v, ok := reg.Volumes[id]
		if !ok || v.Project != rec.Project {
			return false, ErrNotFound
		}
		changed := v.Bytes != bytes || v.Inodes != inodes
		v.Bytes, v.Inodes = bytes, inodes
		rec = *v
		return changed, nil
	})
	if err != nil {
		return Volume{}, err
	}
	return r.volume(id, &rec), nil
}

// Get returns volume id.
func (r *Root) Get(id string) (Volume, error) {
	if err := ValidateID(id); err != nil {
		return Volume{}, fmt.Errorf("get volume: %w", err)
	}
	var vol Volume
	err := r.view(func(reg *registry) error {
		v, ok := reg.Volumes[id]
		if !ok || !v.Ready {
			return fmt.Errorf("volume %q: %w", id, ErrNotFound)
		}
		vol = r.volume(id, v)
		return nil
	})
	return vol, err
}

// Usage reports what volume id consumes, from the project quota.
func (r *Root) Usage(id string) (Usage, error) {
	v, err := r.Get(id)
	if err != nil {
		return Usage{}, fmt.Errorf("usage: %w", err)
	}
	u, err := r.quota.usage(v.Project)
	if err != nil {
		return Usage{}, fmt.Errorf("usage of volume %q: %w", id, err)
	}
	return Usage(u), nil
}

// List returns the volumes, sorted by id.
func (r *Root) List() ([]Volume, error) {
	var out []Volume
	err := r.view(func(reg *registry) error {
		for _, id := range reg.volumeIDs() {
			if v := reg.Volumes[id]; v.Ready {
				out = append(out, r.volume(id, v))
			}
		}
		return nil
	})
	return out, err
}

// Delete removes volume id: its tree (never following symlinks out of it),
// its registry entry, and its limits. This root never hands the project ID
// out again. Deleting a missing volume succeeds.
func (r *Root) Delete(id string) error {
	if err := r.delete(id); err != nil {
		return fmt.Errorf("delete volume %q: %w", id, err)
	}
	return nil
}

func (r *Root) delete(id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	defer r.lockID("volume/" + id)()
	var rec *volumeRecord
	if err := r.view(func(reg *registry) error {
		rec = reg.Volumes[id]
		return nil
	}); err != nil {
		return err
	}
	if rec == nil {
		return nil
	}
	if err := removeTree(int(r.volumes.Fd()), id); err != nil {
		return err
	}
	// The entry goes before the limits: once the limits are cleared, another
	// root on the filesystem may claim the ID, and a retried Delete that still
	// found the entry would clear the limits of the ID's new owner. A crash in
	// between leaves the limits set, and the ID simply stays unused.
	if err := r.update(func(reg *registry) (bool, error) {
		delete(reg.Volumes, id)
		return true, nil
	}); err != nil {
		return err
	}
	if err := r.quota.setLimits(rec.Project, 0, 0); err != nil {
		return err
	}
	klog.V(2).InfoS("simfs volume deleted", "root", r.path, "volume", id, "project", rec.Project)
	return nil
}

// Snapshot copies the tree of volume source into snapshot id. The copy is
// taken while the volume may be in use: each file is copied whole, but the
// tree is not frozen (quiesce writers for a consistent snapshot). Repeating
// it returns the existing snapshot; the id taken by a snapshot of another
// volume is ErrExists.
func (r *Root) Snapshot(id, source string) (Snapshot, error) {
	s, err := r.snapshot(id, source)
	if err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %q of volume %q: %w", id, source, err)
	}
	return s, nil
}

func snapshotOf(id string, s *snapshotRecord) Snapshot {
	return Snapshot{ID: id, Source: s.Source, Bytes: s.Bytes, Inodes: s.Inodes,
		UsedBytes: s.UsedBytes, UsedInodes: s.UsedInodes, Created: time.Unix(0, s.CreatedNs)}
}

func (r *Root) snapshot(id, source string) (Snapshot, error) {
	if err := ValidateID(id); err != nil {
		return Snapshot{}, err
	}
	if err := ValidateID(source); err != nil {
		return Snapshot{}, err
	}
	defer r.lockID("snapshot/" + id)()
	defer r.lockID("volume/" + source)()
	var existing *snapshotRecord
	var vol *volumeRecord
	if err := r.view(func(reg *registry) error {
		existing = reg.Snapshots[id]
		vol = reg.Volumes[source]
		return nil
	}); err != nil {
		return Snapshot{}, err
	}
	if existing != nil {
		if existing.Source != source {
			return Snapshot{}, fmt.Errorf("snapshot exists for volume %q: %w", existing.Source, ErrExists)
		}
		return snapshotOf(id, existing), nil
	}
	if vol == nil || !vol.Ready {
		return Snapshot{}, fmt.Errorf("volume %q: %w", source, ErrNotFound)
	}
	snaps := int(r.snapshots.Fd())
	tmp := tmpPrefix + id
	for _, stale := range []string{tmp, id} { // leftovers of an interrupted attempt
		if err := removeTree(snaps, stale); err != nil {
			return Snapshot{}, err
		}
	}
	stats, reflinks, err := copyTree(int(r.volumes.Fd()), source, snaps, tmp)
	if err != nil {
		return Snapshot{}, err
	}
	if err := unix.Syncfs(snaps); err != nil {
		return Snapshot{}, fmt.Errorf("syncfs: %w", err)
	}
	if err := unix.Renameat(snaps, tmp, snaps, id); err != nil {
		return Snapshot{}, fmt.Errorf("rename into place: %w", err)
	}
	if err := unix.Fsync(snaps); err != nil {
		return Snapshot{}, fmt.Errorf("fsync snapshots directory: %w", err)
	}
	rec := &snapshotRecord{Source: source, Bytes: vol.Bytes, Inodes: vol.Inodes,
		UsedBytes: stats.Bytes, UsedInodes: stats.Inodes, CreatedNs: time.Now().UnixNano(), Ready: true}
	if err := r.update(func(reg *registry) (bool, error) {
		reg.Snapshots[id] = rec
		return true, nil
	}); err != nil {
		return Snapshot{}, err
	}
	klog.V(2).InfoS("simfs snapshot taken", "root", r.path, "snapshot", id, "volume", source,
		"bytes", stats.Bytes, "inodes", stats.Inodes, "reflinkedFiles", reflinks)
	return snapshotOf(id, rec), nil
}

// GetSnapshot returns snapshot id.
func (r *Root) GetSnapshot(id string) (Snapshot, error) {
	if err := ValidateID(id); err != nil {
		return Snapshot{}, fmt.Errorf("get snapshot: %w", err)
	}
	var s Snapshot
	err := r.view(func(reg *registry) error {
		rec, ok := reg.Snapshots[id]
		if !ok {
			return fmt.Errorf("snapshot %q: %w", id, ErrNotFound)
		}
		s = snapshotOf(id, rec)
		return nil
	})
	return s, err
}

// ListSnapshots returns the snapshots, sorted by id.
func (r *Root) ListSnapshots() ([]Snapshot, error) {
	var out []Snapshot
	err := r.view(func(reg *registry) error {
		for _, id := range reg.snapshotIDs() {
			out = append(out, snapshotOf(id, reg.Snapshots[id]))
		}
		return nil
	})
	return out, err
}

// DeleteSnapshot removes snapshot id. Volumes restored from it are
// independent copies and are not affected. Deleting a missing snapshot succeeds.
func (r *Root) DeleteSnapshot(id string) error {
	if err := ValidateID(id); err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	defer r.lockID("snapshot/" + id)()
	snaps := int(r.snapshots.Fd())
	for _, name := range []string{id, tmpPrefix + id} {
		if err := removeTree(snaps, name); err != nil {
			return fmt.Errorf("delete snapshot %q: %w", id, err)
		}
	}
	return r.update(func(reg *registry) (bool, error) {
		_, ok := reg.Snapshots[id]
		delete(reg.Snapshots, id)
		return ok, nil
	})
}

// Restore makes volume id with the given limits holding a copy of snapshot
// source. The limits must hold what the snapshot occupies (ErrConflict
// otherwise). Repeating it returns the volume; an interrupted restore is
// redone from scratch.
func (r *Root) Restore(id string, bytes, inodes uint64, source string) (Volume, error) {
	v, err := r.restore(id, bytes, inodes, source)
	if err != nil {
		return Volume{}, fmt.Errorf("restore snapshot %q into volume %q: %w", source, id, err)
	}
	return v, nil
}

func (r *Root) restore(id string, bytes, inodes uint64, source string) (Volume, error) {
	if err := ValidateID(id); err != nil {
		return Volume{}, err
	}
	if err := ValidateID(source); err != nil {
		return Volume{}, err
	}
	if _, err := validateLimits(bytes, inodes); err != nil {
		return Volume{}, err
	}
	defer r.lockID("snapshot/" + source)()
	s, err := r.GetSnapshot(source)
	if err != nil {
		return Volume{}, err
	}
	// Root bypasses quota, so the copy itself would not stop at the limit.
	if bytes < s.UsedBytes || inodes < s.UsedInodes {
		return Volume{}, fmt.Errorf("snapshot occupies %d bytes, %d inodes; volume limits %d bytes, %d inodes: %w",
			s.UsedBytes, s.UsedInodes, bytes, inodes, ErrConflict)
	}
	return r.create(id, bytes, inodes, source)
}

// restoreInto copies snapshot source into the (empty) directory of volume id.
func (r *Root) restoreInto(source, id string) error {
	if _, _, err := copyTree(int(r.snapshots.Fd()), source, int(r.volumes.Fd()), id); err != nil {
		return err
	}
	if err := unix.Syncfs(int(r.volumes.Fd())); err != nil {
		return fmt.Errorf("syncfs: %w", err)
	}
	return nil
}

// Capacity is the root filesystem's space next to what volumes were promised:
// project quota limits may add up to more than the filesystem holds.
type Capacity struct {
	TotalBytes       uint64 // size of the filesystem
	AvailableBytes   uint64 // free for unprivileged writers
	ProvisionedBytes uint64 // sum of the volumes' byte limits
	Volumes          int
}

// Capacity reports the filesystem's size and free space and the sum of the
// volumes' limits.
func (r *Root) Capacity() (Capacity, error) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(r.fd, &st); err != nil {
		return Capacity{}, fmt.Errorf("capacity of %s: statfs: %w", r.path, err)
	}
	c := Capacity{TotalBytes: st.Blocks * uint64(st.Bsize), AvailableBytes: st.Bavail * uint64(st.Bsize)}
	err := r.view(func(reg *registry) error {
		for _, v := range reg.Volumes {
			c.ProvisionedBytes += v.Bytes
			c.Volumes++
		}
		return nil
	})
	return c, err
}

// lockID serialises operations on one volume or snapshot id while letting
// operations on different ids (long copies, deletes) run in parallel.
func (r *Root) lockID(key string) func() {
	unlock, _ := r.ids.Lock(context.Background(), key) // cannot fail without a deadline
	return unlock
}
