package attachments

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/mounts"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
)

// growUnit is the granularity of an attached volume's size: the nbd
// device's block size.
const growUnit = 4096

// Expand grows a staged ploop volume online to at least newSize bytes
// (rounded up to 4 KiB) and returns its new size: the stack and its nbd
// device grow, then, unless the volume is Block, the filesystem grows on
// its mount point (resize2fs, xfs_growfs), and the filesystem must report
// the new size. A stack that already has the size only gets its device
// and filesystem checked and grown, so the controller's grow of an
// attached volume followed by the node's expansion works, and a repeat
// succeeds. A simfs volume needs no node step: its size is its quota.
// volumePath is where the CO sees the volume: its staging path or one of
// its publish targets.
func (m *Manager) Expand(ctx context.Context, volumeID string, newSize int64, volumePath string) (int64, error) {
	if err := ValidateVolumeID(volumeID); err != nil {
		return 0, err
	}
	if err := m.checkMountPath("volume path", volumePath); err != nil {
		return 0, err
	}
	if newSize <= 0 || newSize > maxVolumeSize {
		return 0, fmt.Errorf("expand %s to %d bytes: %w", volumeID, newSize, ErrInvalid)
	}
	unlock, err := m.begin(ctx, volumeID)
	if err != nil {
		return 0, err
	}
	defer unlock()
	start := time.Now()
	size, err := m.expand(volumeID, newSize, volumePath)
	m.log.V(2).Info("expand", "volume", volumeID, "size", newSize, "result", size, "took", time.Since(start), "err", err)
	return size, err
}

// maxVolumeSize bounds sizes (8 EiB would overflow the rounding).
const maxVolumeSize = int64(1) << 60

func (m *Manager) expand(id string, newSize int64, volumePath string) (int64, error) {
	v := m.get(id)
	if v == nil || v.rec.Kind == "" || !m.knowsPath(v, volumePath) {
		return 0, fmt.Errorf("expand %s at %s: %w", id, volumePath, ErrNotStaged)
	}
	if v.rec.Kind == Simfs {
		u, err := m.opts.Dirs.Usage(id)
		if err != nil {
			return 0, fmt.Errorf("expand %s: %w", id, err)
		}
		return int64(u.BytesLimit), nil
	}
	if v.served == nil || v.served.Device() == "" {
		return 0, fmt.Errorf("expand %s: not attached (%s): %w", id, v.problem, ErrUnavailable)
	}
	size := (newSize + growUnit - 1) / growUnit * growUnit
	dev := v.served.Device()
	devSize, err := mounts.DeviceSize(dev)
	if err != nil {
		return 0, fmt.Errorf("expand %s: %w", id, err)
	}
	switch cur := v.served.Size(); {
	case cur < size:
		if _, err := v.served.Grow(size); err != nil {
			return 0, onlineErr("expand", id, err)
		}
	case devSize < cur:
		// The stack grew (the controller's grow) but the device did not:
		// growing to the same size resizes the device.
		if _, err := v.served.Grow(cur); err != nil {
			return 0, fmt.Errorf("expand %s: %w", id, err)
		}
	}
	if devSize, err = mounts.DeviceSize(dev); err != nil {
		return 0, fmt.Errorf("expand %s: %w", id, err)
	}
	if devSize != v.served.Size() {
		return 0, fmt.Errorf("expand %s: %s has %d bytes, the stack %d", id, dev, devSize, v.served.Size())
	}
	if !v.rec.Block {
		if err := m.mounter.Grow(dev, v.rec.StagingPath); err != nil {
			return 0, fmt.Errorf("expand %s: %w", id, err)
		}
	}
	return devSize, nil
}

// knowsPath reports whether p is where volume v is staged or published.
func (m *Manager) knowsPath(v *volume, p string) bool {
	if p == v.rec.StagingPath {
		return true
	}
	_, ok := v.rec.target(p)
	return ok
}

// The online operations below are what the storage root's catalogue asks
// of the node that serves a ploop volume: only the serving process may
// change a stack that is attached. Each returns an error wrapping
// ErrNotAttached when this Manager does not serve the volume, and the
// catalogue then runs the offline operation itself.

// Attached reports whether volume id, of either kind, is staged on this
// node, or its staging or unstaging is unfinished: the catalogue refuses
// to delete it meanwhile (catalog.Online), which for a simfs volume is all
// that keeps its directory from being removed under a pod. The online
// operations ask for a served stack themselves.
func (m *Manager) Attached(ctx context.Context, volumeID string) (bool, error) {
	if err := ValidateVolumeID(volumeID); err != nil {
		return false, err
	}
	if err := m.checkOpen(); err != nil {
		return false, err
	}
	return m.get(volumeID) != nil, nil
}

// served returns the serving volume of id, or ErrNotAttached.
func (m *Manager) servedVolume(op, id string) (*volume, error) {
	v := m.get(id)
	if v == nil || v.served == nil || v.served.Device() == "" {
		return nil, fmt.Errorf("%s %s: %w", op, id, ErrNotAttached)
	}
	return v, nil
}

// onlineErr maps a volume closed under an operation to ErrNotAttached:
// it was unstaged meanwhile, so the offline operation applies.
func onlineErr(op, id string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("%s %s: %w (%v)", op, id, ErrNotAttached, err)
	}
	if errors.Is(err, serving.ErrResizeUnsupported) {
		// Until the volume is unstaged: the offline grow then applies.
		return fmt.Errorf("%s %s: %w: %v", op, id, ErrInUse, err)
	}
	return fmt.Errorf("%s %s: %w", op, id, err)
}

// Snapshot freezes the served stack's top delta and returns the GUID of
// the frozen delta. The filesystem on the volume is frozen (FIFREEZE) for
// the moment of the switch, so the snapshot holds a clean filesystem,
// not only a crash-consistent one.
func (m *Manager) Snapshot(ctx context.Context, volumeID string) (string, error) {
	if err := ValidateVolumeID(volumeID); err != nil {
		return "", err
	}
	unlock, err := m.begin(ctx, volumeID)
	if err != nil {
		return "", err
	}
	defer unlock()
	v, err := m.servedVolume("snapshot", volumeID)
	if err != nil {
		return "", err
	}
	if !v.rec.Block && v.rec.Staged {
		if mi, ok, _ := mounts.Mounted(v.rec.StagingPath); ok && mi.Source == v.served.Device() {
			if err := mounts.Freeze(v.rec.StagingPath); err != nil {
				return "", fmt.Errorf("snapshot %s: %w", volumeID, err)
			}
			defer func() {
				if err := mounts.Thaw(v.rec.StagingPath); err != nil {
					m.log.Error(err, "thaw after snapshot", "volume", volumeID)
				}
			}()
		}
	}
	guid, st, err := v.served.Snapshot()
	m.log.V(2).Info("online snapshot", "volume", volumeID, "guid", guid, "pause", st.Pause, "err", err)
	m.paused("snapshot", st.Pause, err)
	return guid, onlineErr("snapshot", volumeID, err)
}

// DeleteSnapshot merges the frozen delta guid of the served stack into
// the delta above it, while I/O continues. The merge may take minutes; it
// does not hold the volume's lock, and Unstage waits for it.
func (m *Manager) DeleteSnapshot(ctx context.Context, volumeID, guid string) error {
	if err := ValidateVolumeID(volumeID); err != nil {
		return err
	}
	if err := m.checkOpen(); err != nil {
		return err
	}
	v, err := m.servedVolume("delete snapshot", volumeID)
	if err != nil {
		return err
	}
	st, err := v.served.DeleteSnapshot(guid)
	m.log.V(2).Info("online snapshot delete", "volume", volumeID, "guid", guid, "pause", st.Pause, "err", err)
	m.paused("snapshot-delete", st.Pause, err)
	return onlineErr("delete snapshot", volumeID, err)
}

// Grow grows the served stack, and its kernel device, to size bytes
// (rounded up to 4 KiB); the filesystem grows with Expand. A stack
// already that large is left as it is.
func (m *Manager) Grow(ctx context.Context, volumeID string, size int64) error {
	if err := ValidateVolumeID(volumeID); err != nil {
		return err
	}
	if size <= 0 || size > maxVolumeSize {
		return fmt.Errorf("grow %s to %d bytes: %w", volumeID, size, ErrInvalid)
	}
	unlock, err := m.begin(ctx, volumeID)
	if err != nil {
		return err
	}
	defer unlock()
	v, err := m.servedVolume("grow", volumeID)
	if err != nil {
		return err
	}
	size = (size + growUnit - 1) / growUnit * growUnit
	if v.served.Size() >= size {
		return nil
	}
	st, err := v.served.Grow(size)
	m.paused("grow", st.Pause, err)
	return onlineErr("grow", volumeID, err)
}

// Compact gives the space of discarded and zero clusters of the served
// stack's top delta back to the storage root.
func (m *Manager) Compact(ctx context.Context, volumeID string) error {
	if err := ValidateVolumeID(volumeID); err != nil {
		return err
	}
	if err := m.checkOpen(); err != nil {
		return err
	}
	v, err := m.servedVolume("compact", volumeID)
	if err != nil {
		return err
	}
	res, st, err := v.served.Compact()
	m.log.V(2).Info("online compact", "volume", volumeID, "result", res, "pause", st.Pause, "err", err)
	m.paused("compact", st.Pause, err)
	return onlineErr("compact", volumeID, err)
}

// paused tells the Observer how long a successful online operation held
// the volume's I/O.
func (m *Manager) paused(op string, d time.Duration, err error) {
	if obs := m.opts.Observer; obs != nil && err == nil {
		obs.Paused(op, d)
	}
}
