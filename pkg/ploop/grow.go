package ploop

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Deprecated: ErrGrowNeedsRelocation is no longer returned: Grow relocates the data
// clusters in the way of a larger BAT (see relocateForBAT). It is kept so
// that callers testing for it still compile.
var ErrGrowNeedsRelocation = errors.New("the larger BAT would overlap data clusters (relocation is not implemented yet)")

// Grow sets a larger virtual size on an image open for writing. When the
// new BAT entries do not fit below data_off (with 1 MiB clusters: past 256
// GiB), the data clusters in the way move to the end of the file first
// (crash-safe, see relocate.go). The new BAT space is zeroed and made
// durable before the header that covers it. Grow on an image that is
// being read concurrently must go through Stack.Grow, which waits out
// reads of the old places before they are reused.
func (img *Image) Grow(size int64) error { return img.grow(size, nil) }

// grow is Grow; waitReads, when not nil, returns once every read that started
// before the call has finished.
func (img *Image) grow(size int64, waitReads func()) error {
	if img.readOnly {
		return fmt.Errorf("grow %s: image is read-only: %w", img.path, unix.EPERM)
	}
	if img.closed.Load() {
		return fmt.Errorf("grow %s: %w", img.path, os.ErrClosed)
	}
	img.maintMu.Lock()
	defer img.maintMu.Unlock()
	h := img.Header()
	oldSize := img.Size()
	sectors := (uint64(size) + SectorSize - 1) / SectorSize
	if size <= 0 || sectors < h.Sectors {
		return fmt.Errorf("grow %s to %d: smaller than the current size %d: %w", img.path, size, oldSize, unix.EINVAL)
	}
	if h.Version == 1 && sectors > 0xffffffff {
		return fmt.Errorf("grow %s to %d: too large for a version 1 image: %w", img.path, size, unix.EFBIG)
	}
	entries := max((sectors*SectorSize+uint64(img.cs)-1)/uint64(img.cs), uint64(h.BATEntries))
	oldEnd := HeaderSize + 4*int64(h.BATEntries)
	newEnd := HeaderSize + 4*int64(entries)
	oldStart := int64(h.DataOff) * SectorSize
	if newEnd > oldStart {
		newStart := (newEnd + img.cs - 1) / img.cs * img.cs
		if newStart/SectorSize > math.MaxUint32 {
			return fmt.Errorf("grow %s to %d: a BAT of %d entries does not fit data_off: %w", img.path, size, entries, unix.EFBIG)
		}
		if err := img.relocateForBAT(newStart); err != nil {
			return fmt.Errorf("grow %s to %d: relocate: %w", img.path, size, err)
		}
		// The switches must be durable, and nobody may still be reading
		// the old places, before they become BAT.
		if err := img.syncs.Sync(img.s.Sync); err != nil {
			return fmt.Errorf("grow %s: %w", img.path, err)
		}
		if waitReads != nil {
			waitReads()
		}
		// The hole reads as zeros and detaches the pages of the old
		// clusters from the BAT that will be written over them.
		if err := img.s.PunchHole(oldStart, newStart-oldStart); err != nil {
			return fmt.Errorf("grow %s: %w", img.path, err)
		}
		h.DataOff = uint32(newStart / SectorSize)
	}
	// Bytes past the old size inside the last cluster become visible:
	// they must read as zeros.
	if rem := oldSize % img.cs; rem != 0 {
		i := oldSize / img.cs
		lk := &img.clusterLocks[i%clusterLockStripes]
		lk.Lock()
		host := img.lookup(i)
		var err error
		if host != 0 {
			err = img.s.ZeroRange(host+rem, img.cs-rem)
		}
		lk.Unlock()
		if err != nil {
			return fmt.Errorf("grow %s: %w", img.path, err)
		}
	}
	if pad := min(newEnd, oldStart); pad > oldEnd {
		if _, err := img.s.WriteAt(make([]byte, pad-oldEnd), oldEnd); err != nil {
			return fmt.Errorf("grow %s: %w", img.path, err)
		}
	}
	if err := img.syncs.Sync(img.s.Sync); err != nil {
		return fmt.Errorf("grow %s: %w", img.path, err)
	}
	h.Sectors = sectors
	h.BATEntries = uint32(entries)
	h.Cylinders = uint32(sectors / geometryHeads / geometrySectors)
	// The header goes to disk before the new size is used in memory: a
	// write accepted past the old size must not outlive a header that
	// does not cover it. Meanwhile publishes write the new header too.
	img.mu.Lock()
	meta := make([]byte, max(newEnd, int64(len(img.meta))))
	copy(meta, img.meta)
	h.put(meta[:HeaderSize])
	img.meta = meta
	img.mu.Unlock()
	if err := img.writeBlocks([]int64{0}); err != nil {
		return fmt.Errorf("grow %s: write header: %w", img.path, err)
	}
	if err := img.syncs.Sync(img.s.Sync); err != nil {
		return fmt.Errorf("grow %s: %w", img.path, err)
	}
	img.hooks.at("grow-header")
	img.mu.Lock()
	img.hdr = h
	img.size.Store(int64(sectors) * SectorSize)
	img.mu.Unlock()
	return nil
}

// GrowStack sets a larger virtual size on the (not served) stack in dir.
// Only the top delta changes; the deltas below keep their smaller sizes
// and read as zeros past them. The descriptor is switched first and the
// top grown after it, so RepairStack finishes a grow interrupted between
// the two.
func GrowStack(dir string, size int64) error { return growStack(dir, size, nil) }

func growStack(dir string, size int64, h *hooks) error {
	unlock, err := lockDir(dir)
	if err != nil {
		return fmt.Errorf("grow %s: %w", dir, err)
	}
	defer unlock()
	d, err := ReadDescriptor(dir)
	if err != nil {
		return fmt.Errorf("grow: %w", err)
	}
	sectors := (uint64(size) + SectorSize - 1) / SectorSize
	if size <= 0 || sectors < d.Params.DiskSize {
		return fmt.Errorf("grow %s to %d: smaller than the current size %d: %w", dir, size, d.Size(), unix.EINVAL)
	}
	chain := d.Chain()
	top := chain[len(chain)-1]
	if err := ensureClean(dir, top); err != nil {
		return fmt.Errorf("grow %s: %w", dir, err)
	}
	nd := d.clone()
	nd.setSize(sectors)
	if err := writeDescriptor(dir, nd, h); err != nil {
		return fmt.Errorf("grow %s: %w", dir, err)
	}
	if err := growTopWith(dir, top, nd.Size(), h); err != nil {
		return fmt.Errorf("grow %s: %w", dir, err)
	}
	h.at("grow-top")
	return nil
}

// growTop brings the top delta up to the descriptor's size.
func growTop(dir string, top DescriptorImg, size int64) error {
	return growTopWith(dir, top, size, nil)
}

func growTopWith(dir string, top DescriptorImg, size int64, h *hooks) error {
	path := filepath.Join(dir, top.File)
	if top.Type == TypePlain {
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := lockExclusive(f); err != nil {
			return err
		}
		if err := f.Truncate(size); err != nil {
			return err
		}
		return fdatasync(f)
	}
	img, err := Open(path, OpenOptions{})
	if err != nil {
		return err
	}
	img.hooks = h
	if err := img.Grow(size); err != nil {
		img.Close()
		return err
	}
	return img.Close()
}
