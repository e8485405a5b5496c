package catalog

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// Snapshot describes a snapshot of a volume.
type Snapshot struct {
	ID           string
	Name         string
	SourceVolume string
	Type         Type
	// Size is the source's size when the snapshot was taken: the least a
	// volume restored from it can have.
	Size    int64
	Created time.Time
	// Node is the node whose storage root holds the snapshot, as a
	// catalogue that spans nodes reports it; empty from a node's own.
	Node string
}

func toSnapshot(r *snapshotRecord) Snapshot {
	return Snapshot{ID: r.ID, Name: r.Name, SourceVolume: r.SourceVolume, Type: r.Type, Size: r.Size, Created: r.Created}
}

// CreateSnapshot snapshots a volume, or returns the snapshot an earlier
// request with the same name and source made (the same name for another
// source is ErrExists). For ploop it is O(1): the volume's top delta is
// frozen (online when the volume is attached) and a stack of its own that
// links the frozen deltas is made for the snapshot, so that it outlives the
// volume. For simfs it is a copy of the tree.
func (c *Catalog) CreateSnapshot(ctx context.Context, name, sourceVolume string) (Snapshot, error) {
	return c.CreateSnapshotWithID(ctx, "", name, sourceVolume)
}

// CreateSnapshotWithID is CreateSnapshot with the id a new snapshot gets
// (NewSnapshotID makes one), so that a cluster's controller can name the
// snapshot before the owning node takes it; "" lets the catalogue choose.
// The name taken by a snapshot with another id is ErrExists.
func (c *Catalog) CreateSnapshotWithID(ctx context.Context, id, name, sourceVolume string) (Snapshot, error) {
	s, err := c.createSnapshot(ctx, id, name, sourceVolume)
	if err != nil {
		return Snapshot{}, fmt.Errorf("create snapshot %q of %s: %w", name, sourceVolume, classify(err))
	}
	return s, nil
}

func (c *Catalog) createSnapshot(ctx context.Context, id, name, source string) (Snapshot, error) {
	if err := checkName("snapshot", name); err != nil {
		return Snapshot{}, err
	}
	if id != "" {
		if err := ValidateSnapshotID(id); errors.Is(err, ErrNotFound) {
			return Snapshot{}, fmt.Errorf("requested id %q is not a snapshot id of this driver: %w", id, ErrInvalid)
		} else if err != nil {
			return Snapshot{}, err
		}
	}
	if _, err := ParseVolumeID(source); err != nil {
		return Snapshot{}, fmt.Errorf("source volume: %w", err)
	}
	unlock, err := c.lockKey(ctx, c.snapNameKey(name))
	if err != nil {
		return Snapshot{}, err
	}
	defer unlock()
	if r, ok := c.snapshotByName(name); ok {
		if r.State == stateReady {
			if r.SourceVolume != source {
				return Snapshot{}, fmt.Errorf("snapshot %s exists for volume %s: %w", r.ID, r.SourceVolume, ErrExists)
			}
			if id != "" && r.ID != id {
				return Snapshot{}, fmt.Errorf("snapshot %s has this name, the request names id %s: %w", r.ID, id, ErrExists)
			}
			return toSnapshot(r), nil
		}
		// An earlier attempt failed and could not clean up: do it now,
		// holding the lock of the volume it snapshotted.
		err := func() error {
			unlockSrc, err := c.lockKey(ctx, c.volKey(r.SourceVolume))
			if err != nil {
				return err
			}
			defer unlockSrc()
			return c.rollbackSnapshot(ctx, r, true)
		}()
		if err != nil {
			return Snapshot{}, fmt.Errorf("clean up an earlier attempt: %w", err)
		}
	}
	unlockSrc, err := c.lockKey(ctx, c.volKey(source))
	if err != nil {
		return Snapshot{}, err
	}
	defer unlockSrc()
	v, ok := c.volume(source)
	if !ok || v.State != stateReady {
		return Snapshot{}, fmt.Errorf("source volume %s: %w", source, ErrNotFound)
	}
	if id == "" {
		id = NewSnapshotID()
	} else {
		unlockID, err := c.lockKey(ctx, c.snapKey(id))
		if err != nil {
			return Snapshot{}, err
		}
		defer unlockID()
		if r, ok := c.snapshot(id); ok {
			return Snapshot{}, fmt.Errorf("id %s belongs to snapshot %q: %w", id, r.Name, ErrExists)
		}
	}
	rec := &snapshotRecord{ID: id, Name: name, State: stateCreating, Type: v.Type, SourceVolume: source,
		Size: v.Size, FSType: v.FSType, ClusterSize: v.ClusterSize, Created: time.Now().UTC().Truncate(time.Second)}
	if err := c.putSnapshot(rec); err != nil {
		return Snapshot{}, err
	}
	c.hook("snapshot-creating")
	if err := c.takeSnapshot(ctx, rec); err != nil {
		if rerr := c.rollbackSnapshot(ctx, rec, true); rerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", rerr))
		}
		return Snapshot{}, err
	}
	rec.State = stateReady
	if err := c.putSnapshot(rec); err != nil {
		return Snapshot{}, err
	}
	c.hook("snapshot-ready")
	c.logger().V(2).Info("snapshot created", "snapshot", rec.ID, "name", name, "volume", source, "guid", rec.GUID)
	return toSnapshot(rec), nil
}

func (c *Catalog) takeSnapshot(ctx context.Context, rec *snapshotRecord) error {
	if rec.Type == Ploop {
		guid, err := c.freeze(ctx, rec.SourceVolume)
		if err != nil {
			return err
		}
		// Not recorded until the snapshot is ready: after a crash before
		// that, the frozen delta is linked by the volume alone and the
		// volume's next trim merges it (trimLocked).
		rec.GUID = guid
		c.hook("snapshot-frozen")
		dir := c.snapDir(rec.ID)
		if err := ploop.Clone(c.stackDir(rec.SourceVolume), guid, dir); err != nil {
			return err
		}
		c.hook("snapshot-cloned")
		d, err := ploop.ReadDescriptor(dir)
		if err != nil {
			return err
		}
		rec.Size = d.Size()
		return nil
	}
	d, err := c.dirs()
	if err != nil {
		return err
	}
	_, err = d.Snapshot(rec.ID, rec.SourceVolume)
	return err
}

func (c *Catalog) snapshotByName(name string) (*snapshotRecord, bool) {
	c.mu.Lock()
	id, ok := c.snapByName[name]
	c.mu.Unlock()
	if !ok {
		return nil, false
	}
	return c.snapshot(id)
}

// rollbackSnapshot removes what a failed or interrupted snapshot made, then
// its record. The delta frozen for it, if any, is then linked by the
// volume alone, so trimming the volume merges it; trim says whether to do
// that now (the caller holds the volume's lock) or leave it to Tidy.
func (c *Catalog) rollbackSnapshot(ctx context.Context, r *snapshotRecord, trim bool) error {
	switch r.Type {
	case Ploop:
		if err := removeStack(c.snapDir(r.ID)); err != nil {
			return err
		}
	case Simfs:
		d, err := c.dirs()
		if err != nil {
			return err
		}
		if err := d.DeleteSnapshot(r.ID); err != nil {
			return err
		}
	}
	c.hook("snapshot-rolled-back")
	if err := c.dropSnapshot(r.ID); err != nil {
		return err
	}
	if trim && r.Type == Ploop {
		if err := c.trimLocked(ctx, r.SourceVolume); err != nil {
			c.logger().Error(err, "could not merge the delta of a failed snapshot; Tidy will retry", "volume", r.SourceVolume)
		}
	}
	return nil
}

// GetSnapshot returns a snapshot.
func (c *Catalog) GetSnapshot(ctx context.Context, id string) (Snapshot, error) {
	if err := ValidateSnapshotID(id); err != nil {
		return Snapshot{}, fmt.Errorf("get snapshot: %w", err)
	}
	r, ok := c.snapshot(id)
	if !ok || r.State != stateReady {
		return Snapshot{}, fmt.Errorf("snapshot %s: %w", id, ErrNotFound)
	}
	return toSnapshot(r), nil
}

// DeleteSnapshot deletes a snapshot; deleting what does not exist
// succeeds. Volumes restored from it keep working. For ploop the delta it
// was cloned from is then merged in its source volume, if that still
// exists, so that the source's chain stays as long as its live snapshots
// (online when the source is attached; when that fails the merge stays
// pending for Tidy and the deletion still succeeds).
func (c *Catalog) DeleteSnapshot(ctx context.Context, id string) error {
	if err := c.deleteSnapshot(ctx, id); err != nil {
		return fmt.Errorf("delete snapshot %s: %w", id, classify(err))
	}
	return nil
}

func (c *Catalog) deleteSnapshot(ctx context.Context, id string) error {
	err := ValidateSnapshotID(id)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	unlock, err := c.lockKey(ctx, c.snapKey(id))
	if err != nil {
		return err
	}
	defer unlock()
	r, ok := c.snapshot(id)
	if !ok {
		return nil
	}
	if r.State == stateCreating {
		return fmt.Errorf("it is being created: %w", ErrBusy)
	}
	unlockSrc, err := c.lockKey(ctx, c.volKey(r.SourceVolume))
	if err != nil {
		return err
	}
	defer func() { unlockSrc() }()
	var shared map[fileID]bool
	if r.State == stateReady {
		if r.Type == Ploop {
			shared = stackFiles(c.snapDir(id))
		}
		r.State = stateDeleting
		if err := c.putSnapshot(r); err != nil {
			return err
		}
		c.hook("snapshot-deleting")
	}
	if err := c.finishDeleteSnapshot(r); err != nil {
		return err
	}
	c.logger().V(2).Info("snapshot deleted", "snapshot", id, "name", r.Name, "volume", r.SourceVolume)
	if r.Type != Ploop {
		return nil
	}
	if err := c.trimLocked(ctx, r.SourceVolume); err != nil {
		c.logger().Error(err, "could not merge the deleted snapshot's delta; Tidy will retry", "volume", r.SourceVolume)
	}
	unlockSrc()
	unlockSrc = func() {}
	// Restored volumes may now be the only holders of deltas they share.
	c.trimSharing(ctx, shared)
	return nil
}

// finishDeleteSnapshot removes a snapshot's data, notes the merge its
// source owes, and removes the record. The caller holds the source's lock
// or runs in recovery.
func (c *Catalog) finishDeleteSnapshot(r *snapshotRecord) error {
	switch r.Type {
	case Ploop:
		if err := removeStack(c.snapDir(r.ID)); err != nil {
			return err
		}
		c.hook("snapshot-data-removed")
		if r.GUID != "" {
			if err := c.addPendingMerge(r.SourceVolume, r.GUID); err != nil {
				return err
			}
			c.hook("snapshot-merge-noted")
		}
	case Simfs:
		d, err := c.dirs()
		if err != nil {
			return err
		}
		if err := d.DeleteSnapshot(r.ID); err != nil {
			return err
		}
		c.hook("snapshot-data-removed")
	}
	return c.dropSnapshot(r.ID)
}

// SnapshotFilter narrows ListSnapshots; empty fields match everything.
type SnapshotFilter struct {
	SnapshotID   string
	SourceVolume string
}

// ListSnapshots returns up to max snapshots (0: all) that match the
// filter, in id order after the position token names, and the token of the
// next page. A filter naming no snapshot or volume gives an empty list.
func (c *Catalog) ListSnapshots(ctx context.Context, f SnapshotFilter, token string, max int) ([]Snapshot, string, error) {
	after, err := parseToken(snapshotTokenKind, token)
	if err != nil {
		return nil, "", fmt.Errorf("list snapshots: %w", err)
	}
	if max < 0 {
		return nil, "", fmt.Errorf("list snapshots: max %d: %w", max, ErrInvalid)
	}
	if f.SnapshotID != "" {
		if err := ValidateSnapshotID(f.SnapshotID); errors.Is(err, ErrNotFound) {
			return nil, "", nil
		} else if err != nil {
			return nil, "", fmt.Errorf("list snapshots: %w", err)
		}
	}
	if f.SourceVolume != "" {
		if _, err := ParseVolumeID(f.SourceVolume); errors.Is(err, ErrNotFound) {
			return nil, "", nil
		} else if err != nil {
			return nil, "", fmt.Errorf("list snapshots: %w", err)
		}
	}
	c.mu.Lock()
	var rs []snapshotRecord
	for id, r := range c.snaps {
		if r.State != stateReady || id <= after ||
			(f.SnapshotID != "" && id != f.SnapshotID) || (f.SourceVolume != "" && r.SourceVolume != f.SourceVolume) {
			continue
		}
		rs = append(rs, *r)
	}
	c.mu.Unlock()
	sort.Slice(rs, func(i, j int) bool { return rs[i].ID < rs[j].ID })
	next := ""
	if max > 0 && len(rs) > max {
		rs = rs[:max]
		next = makeToken(snapshotTokenKind, rs[max-1].ID)
	}
	out := make([]Snapshot, len(rs))
	for i := range rs {
		out[i] = toSnapshot(&rs[i])
	}
	return out, next, nil
}
