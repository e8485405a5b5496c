package catalog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

// Filesystems a node may put on a ploop volume.
const (
	FSExt4 = "ext4"
	FSXfs  = "xfs"
)

// Discard modes: how freed filesystem blocks get back to the root. The
// catalogue records the mode; the node applies it.
const (
	// DiscardPeriodic: the node trims staged filesystems periodically.
	DiscardPeriodic = "periodic"
	// DiscardOnline: the filesystem is mounted with online discard.
	DiscardOnline = "online"
)

// VolumeRequest asks for a volume. Zero values mean the defaults.
type VolumeRequest struct {
	// Name is the caller's name for the volume (the CSI name): creation is
	// idempotent by name.
	Name string
	// ID, when set, is the id a new volume gets (NewVolumeID makes one of
	// the request's type). A cluster's controller names a volume before
	// the owning node creates it, so that its custom resource and the CSI
	// volume handle agree from the start; empty lets the catalogue choose.
	ID string
	// Type is Ploop (default) or Simfs.
	Type Type
	// RequiredBytes and LimitBytes are the capacity range; 0 means unset.
	// The size is RequiredBytes rounded up to the type's unit (ploop:
	// 1 MiB; simfs: the quota's 4 KiB), or the default size (the source's
	// size for a clone); rounding past LimitBytes is ErrOutOfRange.
	RequiredBytes, LimitBytes int64
	// FSType is the filesystem the node makes on a ploop volume: FSExt4
	// (default) or FSXfs. A clone must name its source's filesystem.
	FSType string
	// ClusterSize is the ploop cluster size: a power of two from 32 KiB to
	// 64 MiB, default 1 MiB; a clone inherits its source's.
	ClusterSize int64
	// MkfsOptions are extra mkfs arguments for the node (printable ASCII).
	MkfsOptions string
	// Inodes is the simfs inode limit; 0 derives it from the size.
	Inodes uint64
	// Discard is DiscardPeriodic (default) or DiscardOnline.
	Discard string
	// SourceSnapshot or SourceVolume, when set, is the content source:
	// a copy-on-write clone for ploop (O(1)), a copy for simfs.
	SourceSnapshot string
	SourceVolume   string
}

// Volume describes a volume of either type.
type Volume struct {
	ID   string
	Name string
	Type Type
	// Size is the provisioned size in bytes.
	Size           int64
	FSType         string
	ClusterSize    int64 // ploop
	MkfsOptions    string
	Inodes         uint64 // simfs
	Discard        string
	SourceSnapshot string
	SourceVolume   string
	Created        time.Time
	// Node is the node whose storage root holds the volume, as a
	// catalogue that spans nodes reports it; empty from a node's own.
	Node string
}

func toVolume(r *volumeRecord) Volume {
	return Volume{ID: r.ID, Name: r.Name, Type: r.Type, Size: r.Size, FSType: r.FSType, ClusterSize: r.ClusterSize,
		MkfsOptions: r.MkfsOptions, Inodes: r.Inodes, Discard: r.Discard, SourceSnapshot: r.SourceSnapshot,
		SourceVolume: r.SourceVolume, Created: r.Created}
}

// normalize validates a request without touching anything and fills in
// the defaults that do not depend on a content source.
func normalize(req VolumeRequest) (VolumeRequest, error) {
	if err := checkName("volume", req.Name); err != nil {
		return req, err
	}
	switch req.Type {
	case "":
		req.Type = Ploop
	case Ploop, Simfs:
	default:
		return req, fmt.Errorf("type %q: want %q or %q: %w", req.Type, Ploop, Simfs, ErrInvalid)
	}
	switch req.FSType {
	case "":
		req.FSType = FSExt4
	case FSExt4, FSXfs:
	default:
		return req, fmt.Errorf("filesystem %q: want %s or %s: %w", req.FSType, FSExt4, FSXfs, ErrInvalid)
	}
	switch req.Discard {
	case "":
		req.Discard = DiscardPeriodic
	case DiscardPeriodic, DiscardOnline:
	default:
		return req, fmt.Errorf("discard %q: want %q or %q: %w", req.Discard, DiscardPeriodic, DiscardOnline, ErrInvalid)
	}
	if req.ID != "" {
		t, err := ParseVolumeID(req.ID)
		switch {
		case errors.Is(err, ErrNotFound):
			return req, fmt.Errorf("requested id %q is not a volume id of this driver: %w", req.ID, ErrInvalid)
		case err != nil:
			return req, err
		case t != req.Type:
			return req, fmt.Errorf("requested id %q is a %s id, the request is for a %s volume: %w", req.ID, t, req.Type, ErrInvalid)
		case req.ID == req.SourceVolume:
			return req, fmt.Errorf("volume %s cannot be its own source: %w", req.ID, ErrInvalid)
		}
	}
	if len(req.MkfsOptions) > maxMkfsOptions {
		return req, fmt.Errorf("mkfsOptions are %d bytes long, more than %d: %w", len(req.MkfsOptions), maxMkfsOptions, ErrInvalid)
	}
	for i := 0; i < len(req.MkfsOptions); i++ {
		if b := req.MkfsOptions[i]; b < ' ' || b > '~' {
			return req, fmt.Errorf("mkfsOptions have byte %q at %d (printable ASCII only): %w", b, i, ErrInvalid)
		}
	}
	if req.RequiredBytes < 0 || req.LimitBytes < 0 {
		return req, fmt.Errorf("capacity range [%d, %d] is negative: %w", req.RequiredBytes, req.LimitBytes, ErrInvalid)
	}
	if req.LimitBytes > 0 && req.RequiredBytes > req.LimitBytes {
		return req, fmt.Errorf("required %d bytes exceed the limit of %d: %w", req.RequiredBytes, req.LimitBytes, ErrInvalid)
	}
	switch req.Type {
	case Ploop:
		if req.Inodes != 0 {
			return req, fmt.Errorf("inodes applies to simfs volumes only: %w", ErrInvalid)
		}
		if req.ClusterSize != 0 {
			if err := ploop.ValidClusterSize(req.ClusterSize); err != nil {
				return req, fmt.Errorf("clusterSize: %w: %w", err, ErrInvalid)
			}
		}
	case Simfs:
		if req.ClusterSize != 0 {
			return req, fmt.Errorf("clusterSize applies to ploop volumes only: %w", ErrInvalid)
		}
		if req.Inodes > simfs.MaxInodes {
			return req, fmt.Errorf("inodes %d exceed %d: %w", req.Inodes, simfs.MaxInodes, ErrOutOfRange)
		}
	}
	if req.SourceSnapshot != "" && req.SourceVolume != "" {
		return req, fmt.Errorf("two content sources: %w", ErrInvalid)
	}
	if req.SourceSnapshot != "" {
		if err := ValidateSnapshotID(req.SourceSnapshot); err != nil {
			return req, fmt.Errorf("source snapshot: %w", err)
		}
	}
	if req.SourceVolume != "" {
		if _, err := ParseVolumeID(req.SourceVolume); err != nil {
			return req, fmt.Errorf("source volume: %w", err)
		}
	}
	return req, nil
}

// unitOf is the size granularity of a type.
func unitOf(t Type) int64 {
	if t == Simfs {
		// Rounding to simfs's unit first makes the recorded size equal
		// to the limit simfs sets.
		return simfs.BlockSize
	}
	return ploopUnit
}

// maxSizeOf is the largest volume of a type (and ploop cluster size).
func maxSizeOf(t Type, clusterSize int64) int64 {
	if t == Ploop {
		if clusterSize == 0 {
			clusterSize = ploop.DefaultClusterSize
		}
		return min(MaxSize, maxBATEntries*clusterSize)
	}
	return MaxSize
}

// roundSize turns a capacity range into a size: required (def when 0)
// rounded up to unit, which must stay within limit and maxSize.
func roundSize(required, limit, def, unit, maxSize int64) (int64, error) {
	size := required
	if size == 0 {
		size = def
		if limit > 0 && size > limit {
			size = limit / unit * unit
		}
	}
	if size > maxSize {
		return 0, fmt.Errorf("%d bytes: at most %d are allowed: %w", size, maxSize, ErrOutOfRange)
	}
	rounded := (size + unit - 1) / unit * unit
	if rounded == 0 {
		return 0, fmt.Errorf("limit %d bytes is below the %d-byte unit: %w", limit, unit, ErrOutOfRange)
	}
	if limit > 0 && rounded > limit {
		return 0, fmt.Errorf("%d bytes round up to %d (a multiple of %d), above the limit of %d: %w", size, rounded, unit, limit, ErrOutOfRange)
	}
	return rounded, nil
}

// matches reports why an existing volume does not answer a repeated
// request (nil when it does).
func matches(r *volumeRecord, req VolumeRequest) error {
	diff := func(what string, have, want any) error {
		return fmt.Errorf("volume %s exists with %s %v, the request has %v: %w", r.ID, what, have, want, ErrExists)
	}
	switch {
	case r.Type != req.Type:
		return diff("type", r.Type, req.Type)
	case r.SourceSnapshot != req.SourceSnapshot:
		return diff("source snapshot", r.SourceSnapshot, req.SourceSnapshot)
	case r.SourceVolume != req.SourceVolume:
		return diff("source volume", r.SourceVolume, req.SourceVolume)
	case r.FSType != req.FSType:
		return diff("filesystem", r.FSType, req.FSType)
	case r.MkfsOptions != req.MkfsOptions:
		return diff("mkfsOptions", r.MkfsOptions, req.MkfsOptions)
	case r.Discard != req.Discard:
		return diff("discard", r.Discard, req.Discard)
	case req.ClusterSize != 0 && r.ClusterSize != req.ClusterSize:
		return diff("clusterSize", r.ClusterSize, req.ClusterSize)
	case req.ClusterSize == 0 && req.SourceSnapshot == "" && req.SourceVolume == "" && r.Type == Ploop && r.ClusterSize != ploop.DefaultClusterSize:
		return diff("clusterSize", r.ClusterSize, "the default")
	case req.Inodes != 0 && (r.InodesDefault || r.Inodes != req.Inodes):
		return diff("inodes", r.Inodes, req.Inodes)
	case req.Inodes == 0 && r.Type == Simfs && !r.InodesDefault:
		return diff("inodes", r.Inodes, "the default")
	}
	unit := unitOf(r.Type)
	if req.RequiredBytes > 0 && (req.RequiredBytes+unit-1)/unit*unit != r.Size {
		return diff("size", r.Size, req.RequiredBytes)
	}
	if req.LimitBytes > 0 && r.Size > req.LimitBytes {
		return diff("size", r.Size, fmt.Sprintf("a limit of %d", req.LimitBytes))
	}
	return nil
}

// CreateVolume creates a volume, or returns the volume an earlier request
// with the same name and parameters created. The same name with other
// parameters is ErrExists; a size the root cannot promise is ErrNoSpace.
func (c *Catalog) CreateVolume(ctx context.Context, req VolumeRequest) (Volume, error) {
	v, err := c.createVolume(ctx, req)
	if err != nil {
		return Volume{}, fmt.Errorf("create volume %q: %w", req.Name, classify(err))
	}
	return v, nil
}

func (c *Catalog) createVolume(ctx context.Context, req VolumeRequest) (Volume, error) {
	req, err := normalize(req)
	if err != nil {
		return Volume{}, err
	}
	unlock, err := c.lockKey(ctx, c.volNameKey(req.Name))
	if err != nil {
		return Volume{}, err
	}
	defer unlock()

	// The source is locked (after the name, before anything else) so
	// that it cannot go away while it is cloned.
	var srcSnap *snapshotRecord
	var srcVol *volumeRecord
	switch {
	case req.SourceSnapshot != "":
		unlockSrc, err := c.lockKey(ctx, c.snapKey(req.SourceSnapshot))
		if err != nil {
			return Volume{}, err
		}
		defer unlockSrc()
		if s, ok := c.snapshot(req.SourceSnapshot); ok && s.State == stateReady {
			srcSnap = s
		}
	case req.SourceVolume != "":
		unlockSrc, err := c.lockKey(ctx, c.volKey(req.SourceVolume))
		if err != nil {
			return Volume{}, err
		}
		defer unlockSrc()
		if v, ok := c.volume(req.SourceVolume); ok && v.State == stateReady {
			srcVol = v
		}
	}

	if r, ok := c.volumeByName(req.Name); ok {
		if r.State == stateReady {
			if err := matches(r, req); err != nil {
				return Volume{}, err
			}
			if req.ID != "" && r.ID != req.ID {
				return Volume{}, fmt.Errorf("volume %s has this name, the request names id %s: %w", r.ID, req.ID, ErrExists)
			}
			return toVolume(r), nil
		}
		// An earlier attempt failed and could not clean up: do it now.
		if err := c.rollbackVolume(r); err != nil {
			return Volume{}, fmt.Errorf("clean up an earlier attempt: %w", err)
		}
	}

	id := req.ID
	if id == "" {
		id = NewVolumeID(req.Type)
	} else {
		// Taken last: only DeleteVolume locks an id from outside, and it
		// takes no other lock.
		unlockID, err := c.lockKey(ctx, c.volKey(id))
		if err != nil {
			return Volume{}, err
		}
		defer unlockID()
		if r, ok := c.volume(id); ok {
			return Volume{}, fmt.Errorf("id %s belongs to volume %q: %w", id, r.Name, ErrExists)
		}
	}
	rec := &volumeRecord{ID: id, Name: req.Name, State: stateCreating, Type: req.Type,
		FSType: req.FSType, ClusterSize: req.ClusterSize, MkfsOptions: req.MkfsOptions, Inodes: req.Inodes,
		Discard: req.Discard, SourceSnapshot: req.SourceSnapshot, SourceVolume: req.SourceVolume,
		Created: time.Now().UTC().Truncate(time.Second)}
	def, least := c.opts.DefaultSize, int64(0)
	srcType, srcFS, srcCluster := req.Type, req.FSType, req.ClusterSize
	switch {
	case req.SourceSnapshot != "":
		if srcSnap == nil {
			return Volume{}, fmt.Errorf("source snapshot %s: %w", req.SourceSnapshot, ErrNotFound)
		}
		def, least = srcSnap.Size, srcSnap.Size
		srcType, srcFS, srcCluster = srcSnap.Type, srcSnap.FSType, srcSnap.ClusterSize
	case req.SourceVolume != "":
		if srcVol == nil {
			return Volume{}, fmt.Errorf("source volume %s: %w", req.SourceVolume, ErrNotFound)
		}
		def, least = srcVol.Size, srcVol.Size
		srcType, srcFS, srcCluster = srcVol.Type, srcVol.FSType, srcVol.ClusterSize
	}
	if srcType != req.Type {
		return Volume{}, fmt.Errorf("a %s volume cannot be made from a %s source: %w", req.Type, srcType, ErrInvalid)
	}
	if req.Type == Ploop {
		if srcFS != req.FSType {
			return Volume{}, fmt.Errorf("the source holds %s, the request asks for %s: %w", srcFS, req.FSType, ErrInvalid)
		}
		if req.ClusterSize != 0 && srcCluster != req.ClusterSize {
			return Volume{}, fmt.Errorf("the source has %d-byte clusters, the request asks for %d: %w", srcCluster, req.ClusterSize, ErrInvalid)
		}
		if srcCluster == 0 {
			srcCluster = ploop.DefaultClusterSize
		}
		rec.ClusterSize = srcCluster
	}
	size, err := roundSize(req.RequiredBytes, req.LimitBytes, def, unitOf(req.Type), maxSizeOf(req.Type, rec.ClusterSize))
	if err != nil {
		return Volume{}, err
	}
	if size < least {
		return Volume{}, fmt.Errorf("%d bytes are less than the source's %d: %w", size, least, ErrOutOfRange)
	}
	rec.Size = size
	if req.Type == Simfs && req.Inodes == 0 {
		rec.Inodes, rec.InodesDefault = simfs.DefaultInodes(uint64(size)), true
	}
	var d dirVolumes
	if req.Type == Simfs {
		if d, err = c.dirs(); err != nil {
			return Volume{}, err
		}
		if err := needQuota(d); err != nil {
			return Volume{}, err
		}
	}

	if err := c.reserveVolume(rec); err != nil {
		return Volume{}, err
	}
	c.hook("volume-creating")
	if req.Type == Ploop {
		err = c.buildStack(ctx, rec, srcSnap, srcVol)
	} else {
		err = c.buildDir(d, rec, srcSnap)
	}
	if err != nil {
		if rerr := c.rollbackVolume(rec); rerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", rerr))
		}
		if srcVol != nil {
			c.trimLocked(ctx, srcVol.ID)
		}
		return Volume{}, err
	}
	rec.State = stateReady
	if err := c.putVolume(rec); err != nil {
		return Volume{}, err
	}
	c.hook("volume-ready")
	c.logger().V(2).Info("volume created", "volume", rec.ID, "name", rec.Name, "type", rec.Type, "size", rec.Size,
		"sourceSnapshot", rec.SourceSnapshot, "sourceVolume", rec.SourceVolume)
	return toVolume(rec), nil
}

func (c *Catalog) volumeByName(name string) (*volumeRecord, bool) {
	c.mu.Lock()
	id, ok := c.volByName[name]
	c.mu.Unlock()
	if !ok {
		return nil, false
	}
	return c.volume(id)
}

// reserveVolume checks that the root can promise the new volume's size and
// records it (state creating), which counts it as provisioned, as one step.
func (c *Catalog) reserveVolume(rec *volumeRecord) error {
	c.capMu.Lock()
	defer c.capMu.Unlock()
	capa, err := c.capacity()
	if err != nil {
		return err
	}
	if rec.Size > capa.AvailableBytes {
		return fmt.Errorf("%d bytes requested, %d can still be promised (%s): %w", rec.Size, capa.AvailableBytes, capa, ErrNoSpace)
	}
	return c.putVolume(rec)
}

// buildStack makes the stack of a new ploop volume.
func (c *Catalog) buildStack(ctx context.Context, rec *volumeRecord, srcSnap *snapshotRecord, srcVol *volumeRecord) error {
	dir := c.stackDir(rec.ID)
	switch {
	case srcSnap != nil:
		if err := checkStackDir(c.snapDir(srcSnap.ID)); err != nil {
			return err
		}
		if err := ploop.Clone(c.snapDir(srcSnap.ID), srcSnap.GUID, dir); err != nil {
			return err
		}
		c.hook("volume-cloned")
	case srcVol != nil:
		// A snapshot of the source to clone from; its delta stays in the
		// source's chain, shared with the clone, until the clone no
		// longer needs it (trimChain), so no data is copied.
		guid, err := c.freeze(ctx, srcVol.ID) // checks the source's directory
		if err != nil {
			return err
		}
		// Recorded with the ready volume only: until the clone links
		// it, the source alone does, and its next trim merges it.
		rec.CloneSnapshot = guid
		c.hook("volume-source-frozen")
		if err := ploop.Clone(c.stackDir(srcVol.ID), guid, dir); err != nil {
			return err
		}
		c.hook("volume-cloned")
	default:
		return ploop.InitStack(dir, ploop.InitOptions{Size: rec.Size, ClusterSize: rec.ClusterSize})
	}
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return err
	}
	if d.Size() < rec.Size {
		if err := ploop.GrowStack(dir, rec.Size); err != nil {
			return err
		}
		c.hook("volume-grown")
	}
	return nil
}

// buildDir makes the directory of a new simfs volume.
func (c *Catalog) buildDir(d dirVolumes, rec *volumeRecord, srcSnap *snapshotRecord) error {
	switch {
	case srcSnap != nil:
		_, err := d.Restore(rec.ID, uint64(rec.Size), rec.Inodes, srcSnap.ID)
		return err
	case rec.SourceVolume != "":
		// simfs copies through a snapshot; its id is recorded first so
		// that a crash leaves nothing behind.
		rec.CloneSnapshot = NewSnapshotID()
		if err := c.putVolume(rec); err != nil {
			return err
		}
		if _, err := d.Snapshot(rec.CloneSnapshot, rec.SourceVolume); err != nil {
			return err
		}
		c.hook("volume-source-copied")
		if _, err := d.Restore(rec.ID, uint64(rec.Size), rec.Inodes, rec.CloneSnapshot); err != nil {
			return err
		}
		c.hook("volume-restored")
		if err := d.DeleteSnapshot(rec.CloneSnapshot); err != nil {
			return err
		}
		rec.CloneSnapshot = ""
		return nil
	default:
		_, err := d.Create(rec.ID, uint64(rec.Size), rec.Inodes)
		return err
	}
}

// rollbackVolume removes what a failed or interrupted creation made, then
// its record. The caller holds the name's lock, or runs in recovery. The
// source's delta a clone from a volume was made from is then held by the
// source alone: trimChain merges it.
func (c *Catalog) rollbackVolume(r *volumeRecord) error {
	return c.removeVolume(r, "volume-rolled-back")
}

// removeVolume removes a volume's data (and, for a simfs clone, the copy
// it went through), then its record.
func (c *Catalog) removeVolume(r *volumeRecord, point string) error {
	switch r.Type {
	case Ploop:
		if err := removeStack(c.stackDir(r.ID)); err != nil {
			return err
		}
	case Simfs:
		d, err := c.dirs()
		if err != nil {
			return err
		}
		if err := d.Delete(r.ID); err != nil {
			return err
		}
		if r.CloneSnapshot != "" {
			if err := d.DeleteSnapshot(r.CloneSnapshot); err != nil {
				return err
			}
		}
	}
	c.hook(point)
	return c.dropVolume(r.ID)
}

// addPendingMerge notes that delta guid of volume id is to be merged away.
func (c *Catalog) addPendingMerge(id, guid string) error {
	v, ok := c.volume(id)
	if !ok || v.State != stateReady {
		return nil
	}
	for _, g := range v.PendingMerges {
		if g == guid {
			return nil
		}
	}
	v.PendingMerges = append(v.PendingMerges, guid)
	return c.putVolume(v)
}

// GetVolume returns a volume. Ids are validated first: a malformed id is
// ErrInvalid, an id of no volume ErrNotFound.
func (c *Catalog) GetVolume(ctx context.Context, id string) (Volume, error) {
	if _, err := ParseVolumeID(id); err != nil {
		return Volume{}, fmt.Errorf("get volume: %w", err)
	}
	r, ok := c.volume(id)
	if !ok || r.State != stateReady {
		return Volume{}, fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	return toVolume(r), nil
}

// DeleteVolume deletes a volume. Deleting what does not exist succeeds. A
// volume that is attached is ErrInUse. Its snapshots and clones keep
// working: they hold their own links to the deltas they share.
func (c *Catalog) DeleteVolume(ctx context.Context, id string) error {
	if err := c.deleteVolume(ctx, id); err != nil {
		return fmt.Errorf("delete volume %s: %w", id, classify(err))
	}
	return nil
}

func (c *Catalog) deleteVolume(ctx context.Context, id string) error {
	typ, err := ParseVolumeID(id)
	if errors.Is(err, ErrNotFound) {
		return nil // no volume could have this id
	}
	if err != nil {
		return err
	}
	unlock, err := c.lockKey(ctx, c.volKey(id))
	if err != nil {
		return err
	}
	defer func() {
		if unlock != nil {
			unlock()
		}
	}()
	r, ok := c.volume(id)
	if !ok {
		return nil
	}
	if r.State == stateCreating {
		return fmt.Errorf("it is being created: %w", ErrBusy)
	}
	var shared map[fileID]bool
	if r.State == stateReady {
		if on := c.online(); on != nil {
			attached, err := on.Attached(ctx, id)
			if err != nil {
				return fmt.Errorf("ask whether it is attached: %w", err)
			}
			if attached {
				return fmt.Errorf("it is attached to a node: %w", ErrInUse)
			}
		}
		if typ == Ploop {
			// Held until the directory is gone: nobody serves it
			// meanwhile.
			held, err := lockStackDir(c.stackDir(id))
			if err != nil {
				return err
			}
			if held != nil {
				defer held.Close()
			}
			shared = stackFiles(c.stackDir(id))
		}
		r.State = stateDeleting
		if err := c.putVolume(r); err != nil {
			return err
		}
		c.hook("volume-deleting")
	}
	if err := c.finishDeleteVolume(r); err != nil {
		return err
	}
	c.logger().V(2).Info("volume deleted", "volume", id, "name", r.Name)
	unlock()
	unlock = nil
	// The deltas the volume shared may now be held by one stack only.
	c.trimSharing(ctx, shared)
	return nil
}

// finishDeleteVolume removes a volume's data, then its record.
func (c *Catalog) finishDeleteVolume(r *volumeRecord) error {
	return c.removeVolume(r, "volume-data-removed")
}

// ExpandVolume grows a volume to the capacity range (rounded as in
// CreateVolume) and reports the new size and whether the node must expand
// too (ploop: the device and filesystem; simfs: no, the quota is the
// size). A size at or below the current one changes nothing, unless the
// limit is below the current size: volumes never shrink, so that range
// cannot be met (ErrOutOfRange). An attached ploop volume is grown online
// by the process serving it.
func (c *Catalog) ExpandVolume(ctx context.Context, id string, required, limit int64) (int64, bool, error) {
	size, node, err := c.expandVolume(ctx, id, required, limit)
	if err != nil {
		return 0, false, fmt.Errorf("expand volume %s: %w", id, classify(err))
	}
	return size, node, nil
}

func (c *Catalog) expandVolume(ctx context.Context, id string, required, limit int64) (int64, bool, error) {
	typ, err := ParseVolumeID(id)
	if err != nil {
		return 0, false, err
	}
	if required < 0 || limit < 0 || (required == 0 && limit == 0) || (limit > 0 && required > limit) {
		return 0, false, fmt.Errorf("capacity range [%d, %d]: %w", required, limit, ErrInvalid)
	}
	unlock, err := c.lockKey(ctx, c.volKey(id))
	if err != nil {
		return 0, false, err
	}
	defer unlock()
	r, ok := c.volume(id)
	if !ok || r.State != stateReady {
		return 0, false, fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	size, err := roundSize(required, limit, r.Size, unitOf(typ), maxSizeOf(typ, r.ClusterSize))
	if err != nil {
		return 0, false, err
	}
	if size <= r.Size {
		if limit > 0 && r.Size > limit {
			return 0, false, fmt.Errorf("volume %s has %d bytes, more than the limit of %d, and volumes do not shrink: %w", id, r.Size, limit, ErrOutOfRange)
		}
		return r.Size, typ == Ploop, nil
	}
	release, err := c.reserve(size - r.Size)
	if err != nil {
		return 0, false, err
	}
	defer release()
	inodes := r.Inodes
	if r.InodesDefault {
		inodes = max(inodes, simfs.DefaultInodes(uint64(size)))
	}
	switch typ {
	case Ploop:
		// The stack is grown before the record: after a crash in between
		// recovery reads the larger size from the descriptor.
		dir := c.stackDir(id)
		if err := checkStackDir(dir); err != nil {
			return 0, false, err
		}
		d, err := ploop.ReadDescriptor(dir)
		if err != nil {
			return 0, false, err
		}
		if d.Size() < size {
			err := c.dispatch(ctx, id, "grow",
				func(on Online) error { return on.Grow(ctx, id, size) },
				func() error { return ploop.GrowStack(dir, size) })
			if err != nil {
				return 0, false, err
			}
		}
	case Simfs:
		d, err := c.dirs()
		if err != nil {
			return 0, false, err
		}
		if _, err := d.Expand(id, uint64(size), inodes); err != nil {
			return 0, false, err
		}
	}
	c.hook("volume-expanded")
	r.Size, r.Inodes = size, inodes
	if err := c.putVolume(r); err != nil {
		return 0, false, err
	}
	return size, typ == Ploop, nil
}

// ListVolumes returns up to max volumes (0: all) in id order after the
// position token names, and the token of the next page ("" at the end).
func (c *Catalog) ListVolumes(ctx context.Context, token string, max int) ([]Volume, string, error) {
	after, err := parseToken(volumeTokenKind, token)
	if err != nil {
		return nil, "", fmt.Errorf("list volumes: %w", err)
	}
	if max < 0 {
		return nil, "", fmt.Errorf("list volumes: max %d: %w", max, ErrInvalid)
	}
	c.mu.Lock()
	var rs []volumeRecord
	for id, r := range c.vols {
		if r.State == stateReady && id > after {
			rs = append(rs, *r)
		}
	}
	c.mu.Unlock()
	sort.Slice(rs, func(i, j int) bool { return rs[i].ID < rs[j].ID })
	next := ""
	if max > 0 && len(rs) > max {
		rs = rs[:max]
		next = makeToken(volumeTokenKind, rs[max-1].ID)
	}
	out := make([]Volume, len(rs))
	for i := range rs {
		out[i] = toVolume(&rs[i])
	}
	return out, next, nil
}

// lockStackDir takes the lock pkg/ploop takes on a stack directory, so that
// a stack some process serves (outside our Online) is not removed under it
// (ErrInUse). A missing directory gives nil.
func lockStackDir(dir string) (*os.File, error) {
	if !isRealDir(dir) {
		return nil, nil // nothing to lock: removeStack unlinks whatever is there
	}
	f, err := openDirNoFollow(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if err := flockNB(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("stack %s is open in another process: %w: %w", dir, ErrInUse, err)
	}
	return f, nil
}
