package ploop

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Deprecated: ErrGrowNeedsRelocation is no longer returned: Grow relocates the data
// clusters in the way of a larger BAT (see relocateForBAT). It is kept so
// that callers testing for it still compile.
var ErrGrowNeedsRelocation = errors.New("the larger BAT would overlap data clusters (relocation is not implemented yet)")

// Grow sets a larger virtual size on an image open for writing and not in
// use by anyone else. When the new BAT entries do not fit below data_off
// (with 1 MiB clusters: past 256 GiB), the data clusters in the way move to
// the end of the file first (crash-safe, see relocate.go; no I/O may run
// meanwhile). The new BAT space is zeroed and made durable before the
// header that covers it.
func (img *Image) Grow(size int64) error {
	if img.readOnly {
		return fmt.Errorf("grow %s: image is read-only: %w", img.path, unix.EPERM)
	}
	img.flushMu.Lock()
	defer img.flushMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.hdr
	sectors := (uint64(size) + SectorSize - 1) / SectorSize
	if size <= 0 || sectors < h.Sectors {
		return fmt.Errorf("grow %s to %d: smaller than the current size %d: %w", img.path, size, img.size, unix.EINVAL)
	}
	if h.Version == 1 && sectors > 0xffffffff {
		return fmt.Errorf("grow %s to %d: too large for a version 1 image: %w", img.path, size, unix.EFBIG)
	}
	entries := (sectors*SectorSize + uint64(img.cs) - 1) / uint64(img.cs)
	if entries > (uint64(h.DataOff)*SectorSize-HeaderSize)/4 {
		dataOff, err := img.relocateForBAT(entries)
		if err != nil {
			return fmt.Errorf("grow %s to %d: relocate: %w", img.path, size, err)
		}
		h.DataOff = dataOff
	}
	oldEnd := int64(len(img.meta))
	newEnd := HeaderSize + 4*int64(max(entries, uint64(h.BATEntries)))
	// Bytes past the old size inside the last cluster become visible:
	// they must read as zeros.
	if rem := img.size % img.cs; rem != 0 {
		if host := img.entry(img.size / img.cs); host != 0 {
			if err := img.s.ZeroRange(host+rem, img.cs-rem); err != nil {
				return fmt.Errorf("grow %s: %w", img.path, err)
			}
		}
	}
	if newEnd > oldEnd {
		if _, err := img.s.WriteAt(make([]byte, newEnd-oldEnd), oldEnd); err != nil {
			return fmt.Errorf("grow %s: %w", img.path, err)
		}
	}
	if err := img.s.Sync(); err != nil {
		return fmt.Errorf("grow %s: %w", img.path, err)
	}
	h.Sectors = sectors
	h.BATEntries = uint32(max(entries, uint64(h.BATEntries)))
	h.Cylinders = uint32(sectors / geometryHeads / geometrySectors)
	meta := make([]byte, newEnd)
	copy(meta, img.meta)
	h.put(meta[:HeaderSize])
	if _, err := img.s.WriteAt(meta[:HeaderSize], 0); err != nil {
		return fmt.Errorf("grow %s: write header: %w", img.path, err)
	}
	if err := img.s.Sync(); err != nil {
		return fmt.Errorf("grow %s: %w", img.path, err)
	}
	img.hdr, img.meta, img.size = h, meta, int64(sectors)*SectorSize
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
