package mounts

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Grow resizes the filesystem on device, mounted at mountPoint, to the
// device's size: resize2fs on the device for ext4, xfs_growfs on the mount
// point for xfs (mount-utils' ResizeFs picks by what blkid reports). It then
// asks the filesystem for its own size and fails unless it reaches the
// device's, less the tail the tool may leave unused (FSSize.Slack). A
// filesystem that already has the device's size is left as it is, so a
// repeated Grow succeeds.
func (m *Mounter) Grow(device, mountPoint string) error {
	format, err := m.DiskFormat(device)
	if err != nil {
		return fmt.Errorf("grow filesystem on %s: %w", device, err)
	}
	if format != Ext4 && format != XFS {
		return fmt.Errorf("grow filesystem on %s: %q is not ext4 or xfs: %w", device, format, ErrInvalid)
	}
	devSize, err := DeviceSize(device)
	if err != nil {
		return fmt.Errorf("grow filesystem on %s: %w", device, err)
	}
	before, err := FilesystemSize(device, mountPoint, format)
	if err != nil {
		return fmt.Errorf("grow filesystem on %s: %w", device, err)
	}
	if before.Bytes < devSize {
		m.log.V(2).Info("grow filesystem", "device", device, "mountPoint", mountPoint, "fstype", format, "from", before.Bytes, "device", devSize)
		if _, err := m.resize.Resize(device, mountPoint); err != nil {
			return fmt.Errorf("grow filesystem on %s: %w", device, err)
		}
	}
	after, err := FilesystemSize(device, mountPoint, format)
	if err != nil {
		return fmt.Errorf("grow filesystem on %s: %w", device, err)
	}
	if after.Bytes < devSize-after.Slack {
		return fmt.Errorf("grow filesystem on %s: %s reports %d bytes after the resize, the device has %d", device, format, after.Bytes, devSize)
	}
	m.log.V(2).Info("filesystem size", "device", device, "fstype", format, "bytes", after.Bytes, "deviceBytes", devSize)
	return nil
}

// FSSize is a filesystem's own idea of its size.
type FSSize struct {
	// Bytes is the size of the filesystem's data section: blocks × block size.
	Bytes int64
	// Slack is how much of a larger device a grow may leave unused: the
	// tools drop a last allocation group too small to hold its own
	// metadata.
	Slack int64
}

// FilesystemSize reads the size of the fstype filesystem on device,
// mounted at mountPoint: for ext4 from the superblock (read through the
// device's page cache, which shares the buffer the mounted filesystem
// updates), for xfs from XFS_IOC_FSGEOMETRY on the mount point.
func FilesystemSize(device, mountPoint, fstype string) (FSSize, error) {
	switch fstype {
	case Ext4:
		f, err := os.Open(device)
		if err != nil {
			return FSSize{}, fmt.Errorf("ext4 superblock of %s: %w", device, err)
		}
		defer f.Close()
		b := make([]byte, ext4SuperSize)
		if _, err := f.ReadAt(b, ext4SuperOffset); err != nil && !errors.Is(err, io.EOF) {
			return FSSize{}, fmt.Errorf("ext4 superblock of %s: %w", device, err)
		}
		sb, err := ParseExt4Super(b)
		if err != nil {
			return FSSize{}, fmt.Errorf("ext4 superblock of %s: %w", device, err)
		}
		return FSSize{Bytes: sb.Bytes(), Slack: sb.GrowSlack()}, nil
	case XFS:
		g, err := xfsGeometry(mountPoint)
		if err != nil {
			return FSSize{}, err
		}
		return FSSize{Bytes: int64(g.Datablocks) * int64(g.Blocksize), Slack: xfsMinAGBlocks * int64(g.Blocksize)}, nil
	}
	return FSSize{}, fmt.Errorf("size of %s: filesystem %q is not ext4 or xfs: %w", device, fstype, ErrInvalid)
}

// The ext4 superblock: 1024 bytes at offset 1024 of the device.
const (
	ext4SuperOffset = 1024
	ext4SuperSize   = 1024
	ext4Magic       = 0xEF53
	ext4Incompat64  = 0x80
)

// Ext4Super holds the superblock fields that give the filesystem's size.
type Ext4Super struct {
	BlockSize         int64
	Blocks            uint64
	BlocksPerGroup    uint32
	InodesPerGroup    uint32
	InodeSize         uint16
	ReservedGDTBlocks uint16
	DescSize          uint16
}

// Bytes is the filesystem's size.
func (s Ext4Super) Bytes() int64 { return int64(s.Blocks) * s.BlockSize }

// GrowSlack is the largest tail resize2fs leaves unused: a last group
// smaller than its own metadata plus 50 blocks is not added
// (resize2fs's adjust_fs_info).
func (s Ext4Super) GrowSlack() int64 {
	inodeBlocks := (int64(s.InodesPerGroup)*int64(s.InodeSize) + s.BlockSize - 1) / s.BlockSize
	groups := (int64(s.Blocks) + int64(s.BlocksPerGroup) - 1) / int64(s.BlocksPerGroup)
	descBlocks := (groups*int64(s.DescSize) + s.BlockSize - 1) / s.BlockSize
	return (2 + inodeBlocks + 1 + descBlocks + int64(s.ReservedGDTBlocks) + 50) * s.BlockSize
}

// ParseExt4Super decodes an ext4 superblock (the 1024 bytes at offset 1024).
func ParseExt4Super(b []byte) (Ext4Super, error) {
	if len(b) < ext4SuperSize {
		return Ext4Super{}, fmt.Errorf("superblock is %d bytes, want %d", len(b), ext4SuperSize)
	}
	le := binary.LittleEndian
	if m := le.Uint16(b[0x38:]); m != ext4Magic {
		return Ext4Super{}, fmt.Errorf("no ext4 superblock (magic %#x)", m)
	}
	logBlock := le.Uint32(b[0x18:])
	if logBlock > 6 { // 64 KiB blocks at most
		return Ext4Super{}, fmt.Errorf("ext4 block size 1024<<%d is out of range", logBlock)
	}
	s := Ext4Super{
		BlockSize:         1024 << logBlock,
		Blocks:            uint64(le.Uint32(b[0x04:])),
		BlocksPerGroup:    le.Uint32(b[0x20:]),
		InodesPerGroup:    le.Uint32(b[0x28:]),
		InodeSize:         128,
		ReservedGDTBlocks: le.Uint16(b[0xCE:]),
		DescSize:          32,
	}
	if le.Uint32(b[0x4C:]) >= 1 { // dynamic revision: the inode size is recorded
		s.InodeSize = le.Uint16(b[0x58:])
	}
	if le.Uint32(b[0x60:])&ext4Incompat64 != 0 {
		s.Blocks |= uint64(le.Uint32(b[0x150:])) << 32
		if d := le.Uint16(b[0xFE:]); d != 0 {
			s.DescSize = d
		}
	}
	if s.BlocksPerGroup == 0 || s.Blocks == 0 || s.InodeSize == 0 || s.Blocks > 1<<48 {
		return Ext4Super{}, fmt.Errorf("ext4 superblock is inconsistent: %d blocks, %d per group, inode size %d", s.Blocks, s.BlocksPerGroup, s.InodeSize)
	}
	return s, nil
}

// xfsMinAGBlocks is XFS_MIN_AG_BLOCKS: xfs_growfs leaves a tail shorter
// than this unused.
const xfsMinAGBlocks = 64

// xfsGeomV1 is struct xfs_fsop_geom_v1 (xfs_fs.h), 112 bytes.
type xfsGeomV1 struct {
	Blocksize    uint32
	Rtextsize    uint32
	Agblocks     uint32
	Agcount      uint32
	Logblocks    uint32
	Sectsize     uint32
	Inodesize    uint32
	Imaxpct      uint32
	Datablocks   uint64
	Rtblocks     uint64
	Rtextents    uint64
	Logstart     uint64
	UUID         [16]byte
	Sunit        uint32
	Swidth       uint32
	Version      int32
	Flags        uint32
	Logsectsize  uint32
	Rtsectsize   uint32
	Dirblocksize uint32
	_            uint32
}

// xfsIocFSGeometryV1 is _IOR('X', 100, struct xfs_fsop_geom_v1).
const xfsIocFSGeometryV1 = 2<<30 | uint32(unsafe.Sizeof(xfsGeomV1{}))<<16 | 'X'<<8 | 100

func xfsGeometry(mountPoint string) (xfsGeomV1, error) {
	var g xfsGeomV1
	f, err := os.Open(mountPoint)
	if err != nil {
		return g, fmt.Errorf("xfs geometry of %s: %w", mountPoint, err)
	}
	defer f.Close()
	if err := ioctlPtr(int(f.Fd()), uint(xfsIocFSGeometryV1), unsafe.Pointer(&g)); err != nil {
		return g, fmt.Errorf("xfs geometry of %s: %w", mountPoint, err)
	}
	if g.Blocksize == 0 {
		return g, fmt.Errorf("xfs geometry of %s: block size 0", mountPoint)
	}
	return g, nil
}

// ioctlPtr issues an ioctl whose argument is a pointer.
func ioctlPtr(fd int, req uint, arg unsafe.Pointer) error {
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return errno
	}
}
