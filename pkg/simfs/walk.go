package simfs

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// The tree walks below work on directory file descriptors and resolve one
// name at a time with AT_SYMLINK_NOFOLLOW / O_NOFOLLOW. A volume's contents
// are controlled by whoever uses the volume, so no path inside it is ever
// resolved by the kernel as a whole.

const openDirFlags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC

// entryInfo is what the walks need to know about one directory entry.
type entryInfo struct {
	mode  uint32 // S_IFMT bits and permissions
	mntID uint64
	ino   uint64
	dev   uint64
	nlink uint32
	uid   uint32
	gid   uint32
	rdev  uint64
	size  uint64
	atime unix.Timespec
	mtime unix.Timespec
	// blocks is the allocated size in 512-byte units.
	blocks uint64
}

func (e entryInfo) isDir() bool { return e.mode&unix.S_IFMT == unix.S_IFDIR }
func (e entryInfo) isReg() bool { return e.mode&unix.S_IFMT == unix.S_IFREG }
func (e entryInfo) isLnk() bool { return e.mode&unix.S_IFMT == unix.S_IFLNK }

func statEntry(dirfd int, name string, flags int) (entryInfo, error) {
	var sx unix.Statx_t
	mask := unix.STATX_BASIC_STATS | unix.STATX_MNT_ID
	if err := unix.Statx(dirfd, name, flags|unix.AT_SYMLINK_NOFOLLOW|unix.AT_STATX_SYNC_AS_STAT, mask, &sx); err != nil {
		return entryInfo{}, err
	}
	return entryInfo{
		mode:   uint32(sx.Mode),
		mntID:  sx.Mnt_id,
		ino:    sx.Ino,
		dev:    unix.Mkdev(sx.Dev_major, sx.Dev_minor),
		nlink:  sx.Nlink,
		uid:    sx.Uid,
		gid:    sx.Gid,
		rdev:   unix.Mkdev(sx.Rdev_major, sx.Rdev_minor),
		size:   sx.Size,
		atime:  unix.Timespec{Sec: sx.Atime.Sec, Nsec: int64(sx.Atime.Nsec)},
		mtime:  unix.Timespec{Sec: sx.Mtime.Sec, Nsec: int64(sx.Mtime.Nsec)},
		blocks: sx.Blocks,
	}, nil
}

// fstatEntry describes an open file.
func fstatEntry(fd int) (entryInfo, error) {
	return statEntry(fd, "", unix.AT_EMPTY_PATH)
}

// openDirAt opens dirfd/name as a directory, refusing symlinks, and checks it
// is still the directory described by want (not swapped since the stat) and on
// the same mount.
func openDirAt(dirfd int, name string, want entryInfo) (*os.File, error) {
	fd, err := unix.Openat(dirfd, name, openDirFlags, 0)
	if err != nil {
		return nil, fmt.Errorf("open directory %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	got, err := fstatEntry(fd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat directory %s: %w", name, err)
	}
	if got.ino != want.ino || got.dev != want.dev || got.mntID != want.mntID {
		f.Close()
		return nil, fmt.Errorf("directory %s changed during the walk: %w", name, unix.EAGAIN)
	}
	return f, nil
}

// removeTree removes dirfd/name and everything below it without following
// symlinks and without descending into other mounts (a mount inside a volume
// is refused with EXDEV, its contents are left alone). A missing name is not
// an error, so a retried delete succeeds.
func removeTree(dirfd int, name string) error {
	parent, err := fstatEntry(dirfd)
	if err != nil {
		return fmt.Errorf("remove %s: stat parent: %w", name, err)
	}
	return removeAt(dirfd, name, parent.mntID)
}

func removeAt(dirfd int, name string, mntID uint64) error {
	st, err := statEntry(dirfd, name, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	if !st.isDir() {
		if err := unix.Unlinkat(dirfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove %s: %w", name, err)
		}
		return nil
	}
	if st.mntID != mntID {
		return fmt.Errorf("remove %s: it is a mount point: %w", name, unix.EXDEV)
	}
	// A writer still active in the volume can add entries behind the walk;
	// retry a few times, then report ENOTEMPTY.
	for attempt := 0; ; attempt++ {
		dir, err := openDirAt(dirfd, name, st)
		if err != nil {
			return fmt.Errorf("remove: %w", err)
		}
		names, err := dir.Readdirnames(-1)
		if err != nil {
			dir.Close()
			return fmt.Errorf("remove %s: read directory: %w", name, err)
		}
		for _, n := range names {
			if rerr := removeAt(int(dir.Fd()), n, mntID); rerr != nil {
				dir.Close()
				return fmt.Errorf("%s/%w", name, rerr)
			}
		}
		dir.Close()
		err = unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
		switch {
		case err == nil, errors.Is(err, unix.ENOENT):
			return nil
		case errors.Is(err, unix.ENOTEMPTY) && attempt < 3:
			continue
		default:
			return fmt.Errorf("remove %s: %w", name, err)
		}
	}
}
