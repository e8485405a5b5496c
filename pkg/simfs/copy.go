package simfs

import (
	"errors"
	"fmt"
	"path"
	"strconv"

	"golang.org/x/sys/unix"
)

// copyStats is what a copied tree occupies: allocated bytes and inodes, each
// inode counted once however many links it has.
type copyStats struct {
	Bytes, Inodes uint64
}

// treeCopier copies a directory tree like cp -a: owners, modes, xattrs
// (including ACLs and capabilities), timestamps, symlinks, hard links, fifos
// and device nodes; sockets are skipped. File data is reflinked (FICLONE) when
// the filesystem can, otherwise copied with holes preserved.
type treeCopier struct {
	dstRoot int                  // the destination top directory
	links   map[[2]uint64]string // source (dev, ino) → path relative to dstRoot
	mntID   uint64               // the source mount; the walk does not leave it
	stats   copyStats
	// reflinks counts files whose data was cloned rather than copied.
	reflinks int
}

// copyTree copies the contents and attributes of the directory srcParent/srcName
// to dstParent/dstName. The destination is made if missing; an existing empty
// destination directory (a freshly made volume) receives the contents.
func copyTree(srcParent int, srcName string, dstParent int, dstName string) (copyStats, int, error) {
	st, err := statEntry(srcParent, srcName, 0)
	if err != nil {
		return copyStats{}, 0, fmt.Errorf("copy %s: %w", srcName, err)
	}
	if !st.isDir() {
		return copyStats{}, 0, fmt.Errorf("copy %s: not a directory: %w", srcName, unix.ENOTDIR)
	}
	if err := unix.Mkdirat(dstParent, dstName, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return copyStats{}, 0, fmt.Errorf("copy %s: mkdir %s: %w", srcName, dstName, err)
	}
	dst, err := unix.Openat(dstParent, dstName, openDirFlags, 0)
	if err != nil {
		return copyStats{}, 0, fmt.Errorf("copy %s: open %s: %w", srcName, dstName, err)
	}
	defer unix.Close(dst)
	c := &treeCopier{dstRoot: dst, links: map[[2]uint64]string{}, mntID: st.mntID}
	if err := c.copyDir(srcParent, srcName, st, dst, ""); err != nil {
		return copyStats{}, 0, fmt.Errorf("copy %s: %w", srcName, err)
	}
	return c.stats, c.reflinks, nil
}

// copyDir copies srcParent/srcName (described by st) into the open directory
// dst, whose path relative to the destination root is rel.
func (c *treeCopier) copyDir(srcParent int, srcName string, st entryInfo, dst int, rel string) error {
	src, err := openDirAt(srcParent, srcName, st)
	if err != nil {
		return err
	}
	defer src.Close()
	names, err := src.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read directory %s: %w", rel, err)
	}
	c.count(st)
	sfd := int(src.Fd())
	for _, n := range names {
		if err := c.copyEntry(sfd, n, dst, path.Join(rel, n)); err != nil {
			return err
		}
	}
	return c.setAttrs(sfd, dst, "", st)
}

func (c *treeCopier) count(st entryInfo) {
	c.stats.Inodes++
	c.stats.Bytes += st.blocks * 512
}

func (c *treeCopier) copyEntry(src int, name string, dst int, rel string) error {
	st, err := statEntry(src, name, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil // removed by the volume's user during the walk
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", rel, err)
	}
	if st.mntID != c.mntID {
		return fmt.Errorf("%s is a mount point: %w", rel, unix.EXDEV)
	}
	if !st.isDir() && st.nlink > 1 {
		key := [2]uint64{st.dev, st.ino}
		if first, ok := c.links[key]; ok {
			if err := unix.Linkat(c.dstRoot, first, dst, name, 0); err != nil {
				return fmt.Errorf("link %s to %s: %w", rel, first, err)
			}
			return nil
		}
		c.links[key] = rel
	}
	switch st.mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if err := unix.Mkdirat(dst, name, 0o700); err != nil {
			return fmt.Errorf("mkdir %s: %w", rel, err)
		}
		d, err := unix.Openat(dst, name, openDirFlags, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", rel, err)
		}
		defer unix.Close(d)
		return c.copyDir(src, name, st, d, rel)
	case unix.S_IFREG:
		return c.copyFile(src, name, st, dst, rel)
	case unix.S_IFLNK:
		target, err := readlinkAt(src, name)
		if err != nil {
			return fmt.Errorf("readlink %s: %w", rel, err)
		}
		if err := unix.Symlinkat(target, dst, name); err != nil {
			return fmt.Errorf("symlink %s: %w", rel, err)
		}
		c.count(st)
		return c.setAttrs(src, dst, name, st)
	case unix.S_IFIFO, unix.S_IFCHR, unix.S_IFBLK:
		if err := unix.Mknodat(dst, name, st.mode&(unix.S_IFMT|0o7777), int(st.rdev)); err != nil {
			return fmt.Errorf("mknod %s: %w", rel, err)
		}
		c.count(st)
		return c.setAttrs(src, dst, name, st)
	default: // sockets mean nothing without their listener
		return nil
	}
}

func readlinkAt(dirfd int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

func (c *treeCopier) copyFile(src int, name string, st entryInfo, dst int, rel string) error {
	in, err := unix.Openat(src, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", rel, err)
	}
	defer unix.Close(in)
	got, err := fstatEntry(in)
	if err != nil {
		return fmt.Errorf("stat %s: %w", rel, err)
	}
	if !got.isReg() || got.ino != st.ino || got.dev != st.dev {
		return fmt.Errorf("%s changed during the walk: %w", rel, unix.EAGAIN)
	}
	out, err := unix.Openat(dst, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", rel, err)
	}
	defer unix.Close(out)
	if err := unix.IoctlFileClone(out, in); err == nil {
		c.reflinks++
	} else if err := copyData(out, in); err != nil {
		return fmt.Errorf("copy %s: %w", rel, err)
	}
	c.count(got)
	return c.setAttrs(in, out, "", got)
}

// copyData copies the data segments of in to out, leaving holes as holes.
func copyData(out, in int) error {
	var st unix.Stat_t
	if err := unix.Fstat(in, &st); err != nil {
		return err
	}
	size := st.Size
	for off := int64(0); off < size; {
		data, err := unix.Seek(in, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			data = off // no SEEK_DATA: treat everything as data
		}
		hole, err := unix.Seek(in, data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		if err := copyRange(out, in, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return unix.Ftruncate(out, size)
}

func copyRange(out, in int, off, n int64) error {
	for n > 0 {
		inOff, outOff := off, off
		w, err := unix.CopyFileRange(in, &inOff, out, &outOff, int(min(n, 1<<30)), 0)
		if err != nil {
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
				return copyRangeRW(out, in, off, n)
			}
			return err
		}
		if w == 0 {
			return nil // the source shrank under us
		}
		off += int64(w)
		n -= int64(w)
	}
	return nil
}

func copyRangeRW(out, in int, off, n int64) error {
	buf := make([]byte, 1<<20)
	for n > 0 {
		r, err := unix.Pread(in, buf[:min(n, int64(len(buf)))], off)
		if err != nil {
			return err
		}
		if r == 0 {
			return nil
		}
		if _, err := unix.Pwrite(out, buf[:r], off); err != nil {
			return err
		}
		off += int64(r)
		n -= int64(r)
	}
	return nil
}

// setAttrs gives dst (dstfd itself when name is "", else dstfd/name without
// following it) the owner, mode, xattrs and times of the source (srcfd itself
// or srcfd/name). Order matters: chown clears set-id bits and file
// capabilities, so mode and xattrs come after it, times last.
func (c *treeCopier) setAttrs(srcfd, dstfd int, name string, st entryInfo) error {
	what := name
	if what == "" {
		what = "."
	}
	flags := unix.AT_SYMLINK_NOFOLLOW
	if name == "" {
		flags |= unix.AT_EMPTY_PATH
	}
	if err := unix.Fchownat(dstfd, name, int(st.uid), int(st.gid), flags); err != nil {
		return fmt.Errorf("chown %s: %w", what, err)
	}
	if !st.isLnk() { // symlink modes are fixed
		if name == "" {
			if err := unix.Fchmod(dstfd, st.mode&0o7777); err != nil {
				return fmt.Errorf("chmod %s: %w", what, err)
			}
		} else if err := unix.Fchmodat(dstfd, name, st.mode&0o7777, 0); err != nil {
			return fmt.Errorf("chmod %s: %w", what, err)
		}
	}
	if err := copyXattrs(xattrFile{srcfd, name}, xattrFile{dstfd, name}); err != nil {
		return fmt.Errorf("xattrs of %s: %w", what, err)
	}
	ts := []unix.Timespec{st.atime, st.mtime}
	if name == "" {
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, procPath(dstfd, ""), ts, 0); err != nil {
			return fmt.Errorf("set times of %s: %w", what, err)
		}
	} else if err := unix.UtimesNanoAt(dstfd, name, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times of %s: %w", what, err)
	}
	return nil
}

// xattrFile addresses the xattrs of fd itself (name "") or of the entry name
// inside directory fd. The latter goes through /proc/self/fd/N/name: the magic
// link resolves to the open directory, never to whatever a path might now
// point at, and the l*xattr calls do not follow the final name, so xattrs of
// symlinks are copied too.
type xattrFile struct {
	fd   int
	name string
}

func (x xattrFile) path() string { return procPath(x.fd, x.name) }

func (x xattrFile) list(buf []byte) (int, error) {
	if x.name == "" {
		return unix.Flistxattr(x.fd, buf)
	}
	return unix.Llistxattr(x.path(), buf)
}

func (x xattrFile) get(attr string, buf []byte) (int, error) {
	if x.name == "" {
		return unix.Fgetxattr(x.fd, attr, buf)
	}
	return unix.Lgetxattr(x.path(), attr, buf)
}

func (x xattrFile) set(attr string, v []byte) error {
	if x.name == "" {
		return unix.Fsetxattr(x.fd, attr, v, 0)
	}
	return unix.Lsetxattr(x.path(), attr, v, 0)
}

func procPath(fd int, name string) string {
	p := "/proc/self/fd/" + strconv.Itoa(fd)
	if name != "" {
		p += "/" + name
	}
	return p
}

func copyXattrs(src, dst xattrFile) error {
	names, err := listXattrs(src)
	if err != nil {
		return err
	}
	for _, n := range names {
		v, err := getXattr(src, n)
		if errors.Is(err, unix.ENODATA) {
			continue
		}
		if err != nil {
			return fmt.Errorf("get %s: %w", n, err)
		}
		if err := dst.set(n, v); err != nil {
			return fmt.Errorf("set %s: %w", n, err)
		}
	}
	return nil
}

func listXattrs(x xattrFile) ([]string, error) {
	for {
		n, err := x.list(nil)
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil || n == 0 {
			return nil, err
		}
		buf := make([]byte, n)
		n, err = x.list(buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return nil, err
		}
		var names []string
		for start := 0; start < n; {
			end := start
			for end < n && buf[end] != 0 {
				end++
			}
			if end > start {
				names = append(names, string(buf[start:end]))
			}
			start = end + 1
		}
		return names, nil
	}
}

func getXattr(x xattrFile, attr string) ([]byte, error) {
	for {
		n, err := x.get(attr, nil)
		if err != nil {
			return nil, err
		}
		buf := make([]byte, n)
		n, err = x.get(attr, buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}
