package simfs

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// projectLockFile is the lock file, at the root of a filesystem, that
// serialises project-ID allocation among all simfs roots on that filesystem.
// Project IDs belong to the filesystem, not to a root: two roots on one
// filesystem each see the other's IDs only through the quota, so choosing an
// ID and making it visible there must happen under one lock for both.
const projectLockFile = ".simfs-projects.lock"

// projectLock finds and takes the filesystem-wide allocation lock of a root.
type projectLock struct {
	dev uint64 // st_dev of the root's filesystem
	// fsRoot, when set, stands in for the filesystem's root (unit tests with
	// a fake quota, whose "filesystem" is a temporary directory).
	fsRoot string
	// partialWarned: the warning that the filesystem's root is not visible
	// is logged once per Root, not on every Create.
	partialWarned atomic.Bool
}

// lock blocks until it holds the lock and returns its release. Each call opens
// its own file description, so calls exclude each other whether they come from
// one Root, two Roots of one process, or two processes.
func (l *projectLock) lock(rootPath string) (func(), error) {
	fd, where, err := l.open(rootPath)
	if err != nil {
		return nil, fmt.Errorf("project-ID lock: %w", err)
	}
	for {
		err = unix.Flock(fd, unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("project-ID lock: flock %s: %w", where, err)
	}
	return func() {
		// Closing the only descriptor of the description releases the lock.
		unix.Close(fd)
	}, nil
}

// open opens (creating if needed) the lock file and returns it and its path.
func (l *projectLock) open(rootPath string) (int, string, error) {
	if l.fsRoot != "" {
		dfd, err := unix.Open(l.fsRoot, openDirFlags, 0)
		if err != nil {
			return -1, "", fmt.Errorf("open %s: %w", l.fsRoot, err)
		}
		defer unix.Close(dfd)
		return l.openFile(dfd, l.fsRoot)
	}
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return -1, "", fmt.Errorf("find the filesystem's root: %w", err)
	}
	mounts, err := parseMountinfo(data)
	if err != nil {
		return -1, "", fmt.Errorf("find the filesystem's root: /proc/self/mountinfo: %w", err)
	}
	cands := lockCandidates(mounts, l.dev)
	var tried []string
	var lastErr error
	// The lock lives in the shallowest directory of the filesystem that this
	// process can reach: its root unless only bind mounts of parts of it are
	// visible. Several mounts may show that directory, some read-only.
	target := ""
	for _, m := range cands {
		if target != "" && m.root != target {
			break
		}
		dfd, err := openMountRoot(m, l.dev)
		if err != nil {
			lastErr = fmt.Errorf("%s: %w", m.mountPoint, err)
			tried = append(tried, lastErr.Error())
			continue
		}
		target = m.root
		fd, where, err := l.openFile(dfd, m.mountPoint)
		unix.Close(dfd)
		if err == nil {
			if m.root != "/" && !l.partialWarned.Swap(true) {
				klog.InfoS("simfs: the filesystem's root is not visible in this mount namespace; "+
					"project-ID allocation is serialised only with simfs roots that reach the filesystem through the same directory",
					"root", rootPath, "lockFile", where, "directoryInFilesystem", m.root)
			}
			return fd, where, nil
		}
		tried = append(tried, err.Error())
		lastErr = err
		if !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EACCES) {
			return -1, "", err
		}
		// Another mount of the same directory may be writable.
	}
	if len(tried) == 0 {
		return -1, "", fmt.Errorf("no mount of the root's filesystem (device %d:%d) in /proc/self/mountinfo", unix.Major(l.dev), unix.Minor(l.dev))
	}
	msg := "no usable lock file at the filesystem's root"
	if len(tried) > 1 {
		msg += " (" + strings.Join(tried[:len(tried)-1], "; ") + ")"
	}
	return -1, "", fmt.Errorf("%s: %w", msg, lastErr)
}

// lockCandidates returns the mounts of filesystem dev, shallowest root first,
// in an order that does not depend on which root asks, so that every root
// of the filesystem picks the same directory.
func lockCandidates(mounts []mountEntry, dev uint64) []mountEntry {
	var out []mountEntry
	for _, m := range mounts {
		if m.dev == dev {
			out = append(out, m)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		di, dj := rootDepth(out[i].root), rootDepth(out[j].root)
		if di != dj {
			return di < dj
		}
		if out[i].root != out[j].root {
			return out[i].root < out[j].root
		}
		return out[i].id < out[j].id
	})
	return out
}

// rootDepth counts the components of a mountinfo root; roots that are not
// paths (pseudo filesystems) sort last.
func rootDepth(root string) int {
	if !strings.HasPrefix(root, "/") {
		return math.MaxInt
	}
	n := 0
	for _, c := range strings.Split(root, "/") {
		if c != "" {
			n++
		}
	}
	return n
}

// openMountRoot opens the root directory of mount m and checks that it is
// exactly that: the mount named by m (not something mounted over it, not a
// path redirected by a renamed or symlinked parent) and its top directory.
func openMountRoot(m mountEntry, dev uint64) (int, error) {
	fd, err := unix.Open(m.mountPoint, openDirFlags, 0)
	if err != nil {
		return -1, err
	}
	var sx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH|unix.AT_STATX_SYNC_AS_STAT, unix.STATX_MNT_ID, &sx); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("statx: %w", err)
	}
	switch {
	case sx.Mask&unix.STATX_MNT_ID == 0 || sx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0:
		err = fmt.Errorf("kernel does not report mount IDs and mount roots (needs Linux 5.8): %w", unix.ENOTSUP)
	case sx.Mnt_id != m.id || unix.Mkdev(sx.Dev_major, sx.Dev_minor) != dev || sx.Attributes&unix.STATX_ATTR_MOUNT_ROOT == 0:
		err = fmt.Errorf("not the root of mount %d of the filesystem (found mount %d): %w", m.id, sx.Mnt_id, unix.ESTALE)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// openFile opens or creates the lock file in dirfd. The file must be a
// regular file on the filesystem, owned by us and closed to everyone else:
// anyone able to open it could hold the lock and stop every Create.
func (l *projectLock) openFile(dirfd int, dir string) (int, string, error) {
	where := filepath.Join(dir, projectLockFile)
	// O_RDONLY|O_CREAT opens an existing file even on a read-only mount;
	// O_NONBLOCK keeps a FIFO planted under the name from blocking us.
	fd, err := unix.Openat(dirfd, projectLockFile, unix.O_RDONLY|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return -1, where, fmt.Errorf("open %s: %w", where, err)
	}
	st, err := fstatEntry(fd)
	if err != nil {
		unix.Close(fd)
		return -1, where, fmt.Errorf("stat %s: %w", where, err)
	}
	switch {
	case !st.isReg():
		err = fmt.Errorf("%s is not a regular file: %w", where, unix.EINVAL)
	case st.dev != l.dev:
		err = fmt.Errorf("%s is on another filesystem: %w", where, unix.EXDEV)
	case st.uid != uint32(os.Geteuid()) || st.mode&0o077 != 0:
		err = fmt.Errorf("%s is owned by uid %d with mode %#o; want uid %d and no access for others: %w",
			where, st.uid, st.mode&0o7777, os.Geteuid(), unix.EPERM)
	}
	if err != nil {
		unix.Close(fd)
		return -1, where, err
	}
	return fd, where, nil
}
