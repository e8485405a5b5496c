package mounts

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// Filesystems FormatAndMount makes and mounts.
const (
	Ext4 = "ext4"
	XFS  = "xfs"
)

// ErrInvalid says an argument was refused before anything ran.
var ErrInvalid = errors.New("invalid argument")

// Mounter runs the mount and filesystem tools. It holds no state of its
// own beyond the tool runners and is safe for concurrent use; callers
// serialise operations on one mount point.
type Mounter struct {
	sfm    *mount.SafeFormatAndMount
	resize *mount.ResizeFs
	log    klog.Logger
}

// New returns a Mounter that logs to log.
func New(log klog.Logger) *Mounter {
	ex := utilexec.New()
	// The driver runs mount itself, in its own mount namespace (or the
	// host's); systemd scopes only matter for fuse-like mounts.
	return &Mounter{
		sfm:    mount.NewSafeFormatAndMount(mount.NewWithoutSystemd(""), ex),
		resize: mount.NewResizeFs(ex),
		log:    log,
	}
}

// CheckOptions refuses option lists that cannot be passed to mount or mkfs
// as they are: empty entries and entries holding NUL or a line break.
// Nothing goes through a shell, so other characters are harmless.
func CheckOptions(what string, opts []string) error {
	for _, o := range opts {
		if o == "" || strings.ContainsAny(o, "\x00\n\r") {
			return fmt.Errorf("%s %q: empty or holds NUL or a line break: %w", what, o, ErrInvalid)
		}
	}
	return nil
}

// FormatAndMount mounts device at target (created if missing) as fstype,
// ext4 or xfs, after making the filesystem with mkfsOptions when the
// device holds none. A device that holds another filesystem is not
// reformatted: the mount fails. Existing filesystems mounted read-write
// are checked first with fsck -a (mount-utils' SafeFormatAndMount). xfs is
// always mounted with nouuid (see the package doc).
func (m *Mounter) FormatAndMount(device, target, fstype string, mkfsOptions, mountOptions []string) error {
	if fstype != Ext4 && fstype != XFS {
		return fmt.Errorf("format %s: filesystem %q is not ext4 or xfs: %w", device, fstype, ErrInvalid)
	}
	if err := CheckOptions("mkfs option", mkfsOptions); err != nil {
		return err
	}
	if err := CheckOptions("mount option", mountOptions); err != nil {
		return err
	}
	opts := slices.Clone(mountOptions)
	if fstype == XFS && !slices.Contains(opts, "nouuid") {
		opts = append(opts, "nouuid")
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return fmt.Errorf("mount %s: %w", target, err)
	}
	m.log.V(2).Info("format and mount", "device", device, "target", target, "fstype", fstype, "mkfsOptions", mkfsOptions, "mountOptions", opts)
	if err := m.sfm.FormatAndMountSensitiveWithFormatOptions(device, target, fstype, opts, nil, slices.Clone(mkfsOptions)); err != nil {
		return fmt.Errorf("mount %s (%s) on %s: %w", device, fstype, target, err)
	}
	return nil
}

// DiskFormat reports the filesystem on device ("" when it holds none), as
// blkid sees it.
func (m *Mounter) DiskFormat(device string) (string, error) {
	f, err := m.sfm.GetDiskFormat(device)
	if err != nil {
		return "", fmt.Errorf("probe %s: %w", device, err)
	}
	return f, nil
}

// BindMount makes source visible at target. A directory is bound onto a
// directory (created if missing); a block device node onto a file
// (created if missing), which is how Block volumes reach a pod. readOnly
// and options apply to the new mount only (mount-utils remounts the bind
// with them).
func (m *Mounter) BindMount(source, target string, readOnly bool, options []string) error {
	if err := CheckOptions("mount option", options); err != nil {
		return err
	}
	st, err := os.Stat(source)
	if err != nil {
		return fmt.Errorf("bind %s: %w", source, err)
	}
	switch {
	case st.IsDir():
		if err := os.MkdirAll(target, 0o750); err != nil {
			return fmt.Errorf("bind %s on %s: %w", source, target, err)
		}
	case st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0:
		if err := makeFile(target); err != nil {
			return fmt.Errorf("bind %s on %s: %w", source, target, err)
		}
	default:
		return fmt.Errorf("bind %s: neither a directory nor a block device: %w", source, ErrInvalid)
	}
	opts := []string{"bind"}
	if readOnly {
		opts = append(opts, "ro")
	}
	for _, o := range options {
		if !slices.Contains(opts, o) {
			opts = append(opts, o)
		}
	}
	m.log.V(2).Info("bind mount", "source", source, "target", target, "options", opts)
	if err := m.sfm.Mount(source, target, "", opts); err != nil {
		return fmt.Errorf("bind %s on %s: %w", source, target, err)
	}
	return nil
}

// makeFile creates target as an empty file unless a file is there; the
// parent must exist (the CO makes it).
func makeFile(target string) error {
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY|unix.O_NOFOLLOW, 0o640)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	f.Close()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s exists and is not a regular file: %w", target, ErrInvalid)
	}
	return nil
}

// Unmount unmounts target, every mount stacked on it, and removes the
// directory or file (mount-utils' CleanupMountPoint with the mountinfo
// check, which sees bind mounts within one filesystem). A target that is
// already gone, or not a mount point, succeeds; a corrupted mount (its
// device gone: ENOTCONN, ESTALE, EIO) is unmounted too.
func (m *Mounter) Unmount(target string) error {
	for {
		err := mount.CleanupMountPoint(target, m.sfm.Interface, true)
		if err == nil {
			return nil
		}
		// CleanupMountPoint removes one mount; a second one stacked
		// on the target (a repeated mount) leaves it a mount point.
		if mounted, merr := m.IsMountPoint(target); merr != nil || !mounted {
			return fmt.Errorf("unmount %s: %w", target, err)
		}
		m.log.V(2).Info("unmount: another mount is stacked on the target", "target", target, "err", err)
		if uerr := m.sfm.Unmount(target); uerr != nil {
			return fmt.Errorf("unmount %s: %w", target, errors.Join(err, uerr))
		}
	}
}

// IsMountPoint reports whether path is a mount point, from mountinfo when
// a stat cannot tell (bind mounts within one filesystem). A missing path
// is not a mount point; a corrupted one (its device gone) is.
func (m *Mounter) IsMountPoint(path string) (bool, error) {
	ok, err := m.sfm.IsMountPoint(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	case err != nil && mount.IsCorruptedMnt(err):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("is %s a mount point: %w", path, err)
	}
	return ok, nil
}

// IsLikelyNotMountPoint is mount-utils' quick check: it compares the
// device of path with its parent's, so it misses bind mounts within one
// filesystem. A missing path is reported as not a mount point.
func (m *Mounter) IsLikelyNotMountPoint(path string) (bool, error) {
	not, err := m.sfm.IsLikelyNotMountPoint(path)
	if errors.Is(err, fs.ErrNotExist) {
		return true, nil
	}
	return not, err
}

// MountInfo is one line of /proc/self/mountinfo, the parts callers use.
type MountInfo struct {
	// Source is the mounted device ("/dev/nbd0") or the filesystem's
	// source name.
	Source string
	FSType string
	// Root is the directory of the source filesystem that is mounted:
	// "/" for a whole filesystem, the bound directory for a bind mount,
	// the device's name in devtmpfs for a device node bound onto a file.
	Root    string
	Options []string
}

// Mounted returns the topmost mount at path, and false when path is not a
// mount point.
func Mounted(path string) (MountInfo, bool, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return MountInfo{}, false, fmt.Errorf("read mountinfo: %w", err)
	}
	// Later lines are mounted later, on top of earlier ones.
	for i := len(infos) - 1; i >= 0; i-- {
		in := infos[i]
		if unescapeMountinfo(in.MountPoint) == path {
			opts := append(slices.Clone(in.MountOptions), in.SuperOptions...)
			return MountInfo{Source: unescapeMountinfo(in.Source), FSType: in.FsType, Root: unescapeMountinfo(in.Root), Options: opts}, true, nil
		}
	}
	return MountInfo{}, false, nil
}

// unescapeMountinfo undoes the kernel's octal escapes of space, tab, line
// feed and backslash in mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// DeviceSize is the size in bytes of a block device, from sysfs.
func DeviceSize(device string) (int64, error) {
	real, err := filepath.EvalSymlinks(device)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", device, err)
	}
	b, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(real), "size"))
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", device, err)
	}
	var sectors int64
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d", &sectors); err != nil {
		return 0, fmt.Errorf("size of %s: %q: %w", device, b, err)
	}
	return sectors * 512, nil
}
