package mounts

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Filesystem ioctls (linux/fs.h); golang.org/x/sys/unix does not name them.
const (
	fiFreeze = 0xC0045877 // _IOWR('X', 119, int)
	fiThaw   = 0xC0045878 // _IOWR('X', 120, int)
	fiTrim   = 0xC0185879 // _IOWR('X', 121, struct fstrim_range)
)

// fstrimRange is struct fstrim_range.
type fstrimRange struct {
	Start, Len, MinLen uint64
}

// Trim discards the free space of the filesystem mounted at mountPoint
// (FITRIM, what fstrim does) and returns how many bytes the filesystem
// says it discarded. On a ploop volume the discards become holes in the
// top delta, so the space returns to the storage root.
func Trim(mountPoint string) (uint64, error) {
	f, err := os.Open(mountPoint)
	if err != nil {
		return 0, fmt.Errorf("trim %s: %w", mountPoint, err)
	}
	defer f.Close()
	r := fstrimRange{Len: math.MaxUint64}
	if err := ioctlPtr(int(f.Fd()), fiTrim, unsafe.Pointer(&r)); err != nil {
		return 0, fmt.Errorf("trim %s: %w", mountPoint, err)
	}
	return r.Len, nil
}

// Freeze suspends writes to the filesystem mounted at mountPoint and makes
// it consistent on its device (FIFREEZE), for a snapshot of the device.
// Thaw must follow; a frozen filesystem blocks its writers until then.
func Freeze(mountPoint string) error {
	return freezeIoctl(mountPoint, fiFreeze, "freeze")
}

// Thaw resumes a filesystem frozen by Freeze. Thawing a filesystem that is
// not frozen succeeds, so recovery can thaw whatever a killed process left
// frozen.
func Thaw(mountPoint string) error {
	err := freezeIoctl(mountPoint, fiThaw, "thaw")
	if errors.Is(err, unix.EINVAL) {
		return nil
	}
	return err
}

func freezeIoctl(mountPoint string, req uint, what string) error {
	f, err := os.Open(mountPoint)
	if err != nil {
		return fmt.Errorf("%s %s: %w", what, mountPoint, err)
	}
	defer f.Close()
	var zero int32
	if err := ioctlPtr(int(f.Fd()), req, unsafe.Pointer(&zero)); err != nil {
		return fmt.Errorf("%s %s: %w", what, mountPoint, err)
	}
	return nil
}

// Stats is what statfs says of a filesystem, in bytes and inodes.
type Stats struct {
	TotalBytes, FreeBytes, AvailableBytes int64
	TotalInodes, FreeInodes               int64
}

// UsedBytes is what the filesystem holds.
func (s Stats) UsedBytes() int64 { return s.TotalBytes - s.FreeBytes }

// UsedInodes is how many inodes are in use.
func (s Stats) UsedInodes() int64 { return s.TotalInodes - s.FreeInodes }

// Stat returns the statistics of the filesystem that holds path.
func Stat(path string) (Stats, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return Stats{}, fmt.Errorf("statfs %s: %w", path, err)
	}
	bs := st.Bsize
	if st.Frsize > 0 {
		bs = st.Frsize
	}
	return Stats{
		TotalBytes:     int64(st.Blocks) * bs,
		FreeBytes:      int64(st.Bfree) * bs,
		AvailableBytes: int64(st.Bavail) * bs,
		TotalInodes:    int64(st.Files),
		FreeInodes:     int64(st.Ffree),
	}, nil
}

// Ext4Errors returns how many errors the ext4 filesystem on device has
// logged since it was made (/sys/fs/ext4/DEV/errors_count, kept in the
// superblock). It fails with an error wrapping os.ErrNotExist when no ext4
// filesystem on device is mounted. An error may take a moment to be
// counted: with errors=continue the kernel updates the superblock from
// deferred work, so a periodic check sees it on a later round.
func Ext4Errors(device string) (int64, error) {
	real, err := filepath.EvalSymlinks(device)
	if err != nil {
		return 0, fmt.Errorf("ext4 errors of %s: %w", device, err)
	}
	b, err := os.ReadFile(filepath.Join("/sys/fs/ext4", filepath.Base(real), "errors_count"))
	if err != nil {
		return 0, fmt.Errorf("ext4 errors of %s: %w", device, err)
	}
	n, err := ParseCount(b)
	if err != nil {
		return 0, fmt.Errorf("ext4 errors of %s: %w", device, err)
	}
	return n, nil
}

// ParseCount parses a sysfs counter: a decimal number and a line feed.
func ParseCount(b []byte) (int64, error) {
	s := strings.TrimSuffix(string(b), "\n")
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad counter %q", b)
	}
	return n, nil
}
