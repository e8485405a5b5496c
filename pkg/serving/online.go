package serving

import (
	"fmt"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"k8s.io/klog/v2"
)

// Online operations run on the open stack while it is served: I/O pauses
// only while the stack switches its chain of deltas, and each operation
// returns that pause. They fail with ErrNotStack on anything but a
// writable stack.

// online runs op with the volume locked, so that it never overlaps an
// attach, a close or another online operation of this volume.
func (v *Volume) online(name string, op func() error) error {
	done, err := v.begin(name)
	if err != nil {
		return err
	}
	defer done()
	if v.stack == nil || v.readOnly {
		return fmt.Errorf("%s %s: %w", name, v.path, ErrNotStack)
	}
	return op()
}

// Snapshot freezes the current contents as a new snapshot and returns its
// GUID. The filesystem on the device should be frozen (fsfreeze) for the
// snapshot to be consistent at its level.
func (v *Volume) Snapshot() (guid string, st ploop.OnlineStats, err error) {
	err = v.online("snapshot", func() error {
		guid, st, err = v.stack.Snapshot()
		return err
	})
	klog.InfoS("serving: snapshot", "dir", v.path, "guid", guid, "pause", st.Pause, "err", err)
	return guid, st, err
}

// DeleteSnapshot deletes snapshot guid by merging its delta into the one
// above it, while I/O continues.
func (v *Volume) DeleteSnapshot(guid string) (st ploop.OnlineStats, err error) {
	if !ploop.ValidGUID(guid) {
		return st, fmt.Errorf("delete snapshot of %s: bad GUID %q", v.path, guid)
	}
	err = v.online("delete snapshot", func() error {
		st, err = v.stack.DeleteSnapshot(guid)
		return err
	})
	klog.InfoS("serving: delete snapshot", "dir", v.path, "guid", guid, "pause", st.Pause, "err", err)
	return st, err
}

// Grow grows the virtual disk to size and, when the volume is attached,
// the kernel device with it; the filesystem on the device is then grown
// by its own tool (resize2fs, xfs_growfs). On an attached volume size must
// be a multiple of the device's 4096-byte blocks, checked before anything
// changes.
func (v *Volume) Grow(size int64) (st ploop.OnlineStats, err error) {
	err = v.online("grow", func() error {
		if v.att != nil && size%4096 != 0 {
			return fmt.Errorf("grow %s to %d: an attached volume grows in whole 4096-byte blocks", v.path, size)
		}
		if _, ok := v.att.(ublkDevice); ok {
			// Checked before the stack grows: the device could not follow.
			return fmt.Errorf("grow %s: attached through %s: %w", v.path, v.att.Path(), ErrResizeUnsupported)
		}
		if st, err = v.stack.Grow(size); err != nil {
			return err
		}
		if v.att != nil {
			if err := v.att.Resize(v.stack.Size()); err != nil {
				// The stack has grown; a Reattach or the next Attach
				// gives the device its size.
				return fmt.Errorf("grow %s: the stack grew but the device did not: %w", v.path, err)
			}
		}
		return nil
	})
	klog.InfoS("serving: grow", "dir", v.path, "size", size, "pause", st.Pause, "err", err)
	return st, err
}

// Compact gives the space of discarded and zero clusters of the top delta
// back to the filesystem that holds it.
func (v *Volume) Compact() (res ploop.CompactResult, st ploop.OnlineStats, err error) {
	err = v.online("compact", func() error {
		res, st, err = v.stack.Compact()
		return err
	})
	klog.InfoS("serving: compact", "dir", v.path, "result", res, "pause", st.Pause, "err", err)
	return res, st, err
}
