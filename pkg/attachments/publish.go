package attachments

import (
	"context"
	"fmt"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/mounts"
)

// PublishRequest asks for a staged volume to be made visible at a target.
type PublishRequest struct {
	VolumeID    string
	StagingPath string
	// TargetPath is a directory for a filesystem or simfs volume, a file
	// for a Block volume; it is created if missing (its parent must
	// exist).
	TargetPath string
	// Block must match how the volume was staged.
	Block    bool
	ReadOnly bool
	// SingleWriter (a single-writer access mode) refuses the publish with
	// ErrOtherTarget while the volume is published at another target, and
	// a later publish at another target while this one stands.
	SingleWriter bool
	// MountOptions apply to the bind mount (nosuid, noexec, ...).
	MountOptions []string
}

// Publish bind-mounts a staged volume onto the target: the staging mount
// of a ploop filesystem, the device node of a Block volume (onto a file),
// the directory of a simfs volume. A volume may be published at several
// targets, unless a publish is SingleWriter: that one is the volume's
// only target, and a publish at a second target while it stands, or a
// SingleWriter publish while another stands, is ErrOtherTarget. Publish
// is idempotent: the same target again succeeds; the same target with
// another read-only or single-writer mode, or a target where something
// else is mounted, is ErrConflict. The publish is recorded before the
// mount, so Unstage never detaches a volume a pod still uses.
func (m *Manager) Publish(ctx context.Context, req PublishRequest) error {
	if err := ValidateVolumeID(req.VolumeID); err != nil {
		return err
	}
	if err := m.checkMountPath("staging path", req.StagingPath); err != nil {
		return err
	}
	if err := m.checkMountPath("target path", req.TargetPath); err != nil {
		return err
	}
	if req.TargetPath == req.StagingPath {
		return fmt.Errorf("publish %s: the target is the staging path: %w", req.VolumeID, ErrInvalid)
	}
	if err := checkOptions("mount option", req.MountOptions); err != nil {
		return err
	}
	unlock, err := m.begin(ctx, req.VolumeID)
	if err != nil {
		return err
	}
	defer unlock()
	start := time.Now()
	err = m.publish(req)
	m.log.V(2).Info("publish", "volume", req.VolumeID, "target", req.TargetPath, "readOnly", req.ReadOnly, "block", req.Block, "took", time.Since(start), "err", err)
	return err
}

func (m *Manager) publish(req PublishRequest) error {
	id := req.VolumeID
	v := m.get(id)
	switch {
	case v == nil || v.rec.Kind == "":
		return fmt.Errorf("publish %s: %w", id, ErrNotStaged)
	case v.rec.StagingPath != req.StagingPath:
		return fmt.Errorf("publish %s: staged at %s, not %s: %w", id, v.rec.StagingPath, req.StagingPath, ErrNotStaged)
	case !v.rec.Staged:
		return fmt.Errorf("publish %s: its staging did not finish: %w", id, ErrNotStaged)
	case v.rec.Block != req.Block:
		return fmt.Errorf("publish %s: staged with block=%t, asked with block=%t: %w", id, v.rec.Block, req.Block, ErrConflict)
	}
	for _, t := range v.rec.Targets {
		if within(req.TargetPath, t.Path) != within(t.Path, req.TargetPath) {
			return fmt.Errorf("publish %s: target %s nests with target %s: %w", id, req.TargetPath, t.Path, ErrInvalid)
		}
	}
	var source string
	switch {
	case v.rec.Kind == Simfs:
		source = v.rec.Path
	case v.served == nil || v.served.Device() == "":
		return fmt.Errorf("publish %s: not attached (%s): %w", id, v.problem, ErrUnavailable)
	case v.rec.Block:
		source = v.served.Device()
	default:
		// Never bind an empty staging directory: a pod would write into
		// the node's disk instead of the volume.
		mi, ok, err := mounts.Mounted(v.rec.StagingPath)
		if err != nil {
			return fmt.Errorf("publish %s: %w", id, err)
		}
		if !ok || mi.Source != v.served.Device() {
			return fmt.Errorf("publish %s: its filesystem is not mounted at %s: stage it again: %w", id, v.rec.StagingPath, ErrUnavailable)
		}
		source = v.rec.StagingPath
	}
	mounted, err := m.mounter.IsMountPoint(req.TargetPath)
	if err != nil {
		return fmt.Errorf("publish %s: %w", id, err)
	}
	if t, ok := v.rec.target(req.TargetPath); ok {
		if t.ReadOnly != req.ReadOnly || t.SingleWriter != req.SingleWriter {
			return fmt.Errorf("publish %s: published at %s with readOnly=%t, singleWriter=%t: %w", id, t.Path, t.ReadOnly, t.SingleWriter, ErrConflict)
		}
		if mounted {
			return nil
		}
	} else {
		for _, t := range v.rec.Targets {
			if req.SingleWriter || t.SingleWriter {
				return fmt.Errorf("publish %s at %s: it is published at %s, and a single-writer volume has one target: %w", id, req.TargetPath, t.Path, ErrOtherTarget)
			}
		}
		if mounted {
			return fmt.Errorf("publish %s: something else is mounted at %s: %w", id, req.TargetPath, ErrConflict)
		}
		rec := v.rec.clone()
		if len(rec.Targets) >= maxTargets {
			return fmt.Errorf("publish %s: already published at %d targets: %w", id, len(rec.Targets), ErrInvalid)
		}
		rec.Targets = append(rec.Targets, target{Path: req.TargetPath, ReadOnly: req.ReadOnly, SingleWriter: req.SingleWriter})
		if v, err = m.save(v, rec); err != nil {
			return err
		}
	}
	if err := m.mounter.BindMount(source, req.TargetPath, req.ReadOnly, req.MountOptions); err != nil {
		// Forget the target unless the mount happened after all.
		if now, merr := m.mounter.IsMountPoint(req.TargetPath); merr == nil && !now {
			m.save(v, v.rec.withoutTarget(req.TargetPath))
		}
		return fmt.Errorf("publish %s: %w", id, err)
	}
	return nil
}

// Unpublish unmounts the target and removes it, and forgets the publish.
// A target that is already gone or not mounted succeeds, whether or not
// the volume is staged here.
func (m *Manager) Unpublish(ctx context.Context, volumeID, targetPath string) error {
	if err := ValidateVolumeID(volumeID); err != nil {
		return err
	}
	if err := m.checkMountPath("target path", targetPath); err != nil {
		return err
	}
	unlock, err := m.begin(ctx, volumeID)
	if err != nil {
		return err
	}
	defer unlock()
	start := time.Now()
	err = m.mounter.Unmount(targetPath)
	if err == nil {
		if v := m.get(volumeID); v != nil {
			if _, ok := v.rec.target(targetPath); ok {
				_, err = m.save(v, v.rec.withoutTarget(targetPath))
			}
		}
	}
	m.log.V(2).Info("unpublish", "volume", volumeID, "target", targetPath, "took", time.Since(start), "err", err)
	if err != nil {
		return fmt.Errorf("unpublish %s: %w", volumeID, err)
	}
	return nil
}
