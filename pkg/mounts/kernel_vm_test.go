package mounts

// Kernel-facing tests: one VM boot (test/e2e/vmtest) runs every case on
// loop devices with the real mount, mkfs and resize tools. The same calls
// on nbd devices are exercised by pkg/attachments' VM tests.

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
	"golang.org/x/sys/unix"
)

func TestKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Timeout: 10 * time.Minute}, []vmtest.Case{
		{Name: "FormatAndMountExt4", Run: testFormatAndMountExt4},
		{Name: "XFSCloneNouuid", Run: testXFSCloneNouuid},
		{Name: "BindMounts", Run: testBindMounts},
		{Name: "GrowExt4", Run: func(t *testing.T) { testGrow(t, Ext4, 64) }},
		{Name: "GrowXFS", Run: func(t *testing.T) { testGrow(t, XFS, 320) }},
		{Name: "TrimFreeze", Run: testTrimFreeze},
	})
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// loopFile attaches a sparse file of size MiB to a loop device.
func loopFile(t *testing.T, file string, sizeMiB int) string {
	t.Helper()
	if sizeMiB > 0 {
		f, err := os.Create(file)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(int64(sizeMiB) << 20); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	dev := strings.TrimSpace(run(t, "losetup", "--find", "--show", file))
	t.Cleanup(func() { exec.Command("losetup", "--detach", dev).Run() })
	return dev
}

func newLoop(t *testing.T, sizeMiB int) string {
	return loopFile(t, filepath.Join(t.TempDir(), "disk.img"), sizeMiB)
}

// cleanupUnmount unmounts target at the end of the test, before the loop
// device goes (cleanups run last-registered first).
func cleanupUnmount(t *testing.T, target string) {
	t.Cleanup(func() { unix.Unmount(target, unix.MNT_DETACH) })
}

func mustMounted(t *testing.T, path string) MountInfo {
	t.Helper()
	mi, ok, err := Mounted(path)
	if err != nil || !ok {
		t.Fatalf("%s is not mounted: %v", path, err)
	}
	return mi
}

// testFormatAndMountExt4: a blank device is formatted with the caller's
// mkfs options and mounted with its mount options; a formatted one is not
// formatted again; Unmount removes the mount point and repeats; the ext4
// error counter reads 0 and counts an error.
func testFormatAndMountExt4(t *testing.T) {
	m := New(testLogger(t))
	dev := newLoop(t, 64)
	target := filepath.Join(t.TempDir(), "staging", "vol")
	if err := m.FormatAndMount(dev, target, Ext4, []string{"-L", "ploopcsi"}, []string{"noatime"}); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, target)
	mi := mustMounted(t, target)
	if mi.Source != dev || mi.FSType != "ext4" || !slices.Contains(mi.Options, "noatime") {
		t.Fatalf("mounted %+v", mi)
	}
	if got := strings.TrimSpace(run(t, "blkid", "-s", "LABEL", "-o", "value", dev)); got != "ploopcsi" {
		t.Fatalf("label %q: mkfs options not used", got)
	}
	if f, err := m.DiskFormat(dev); err != nil || f != Ext4 {
		t.Fatalf("DiskFormat = %q, %v", f, err)
	}
	if n, err := Ext4Errors(dev); err != nil || n != 0 {
		t.Fatalf("Ext4Errors of a fresh filesystem = %d, %v", n, err)
	}
	data := bytes.Repeat([]byte("ploop"), 1000)
	if err := os.WriteFile(filepath.Join(target, "keep"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if mounted, err := m.IsMountPoint(target); err != nil || !mounted {
		t.Fatalf("IsMountPoint = %t, %v", mounted, err)
	}
	if not, err := m.IsLikelyNotMountPoint(target); err != nil || not {
		t.Fatalf("IsLikelyNotMountPoint = %t, %v", not, err)
	}
	for i := range 2 {
		if err := m.Unmount(target); err != nil {
			t.Fatalf("unmount #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("mount point left after Unmount: %v", err)
	}
	if _, err := Ext4Errors(dev); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Ext4Errors of an unmounted device: %v", err)
	}
	// Mounted again, not formatted again; a mismatched type is refused.
	if err := m.FormatAndMount(dev, target, XFS, nil, nil); err == nil {
		t.Fatal("ext4 device mounted as xfs")
	}
	m.Unmount(target)
	if err := m.FormatAndMount(dev, target, Ext4, nil, nil); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(target, "keep")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("file after the second mount: %d bytes, %v", len(got), err)
	}
	// The kernel's test hook logs an ext4 error.
	if err := os.WriteFile(filepath.Join("/sys/fs/ext4", filepath.Base(dev), "trigger_fs_error"), []byte("test\n"), 0); err != nil {
		t.Fatal(err)
	}
	// With errors=continue and a journal the kernel folds the error into
	// the superblock's count from deferred work (s_error_work), so the
	// count shows up shortly after the error, not at once.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if n, err := waitExt4Errors(ctx, dev); err != nil || n < 1 {
		t.Fatalf("Ext4Errors after an error = %d, %v", n, err)
	}
	if err := m.Unmount(target); err != nil {
		t.Fatal(err)
	}
}

// testXFSCloneNouuid: a byte copy of an xfs filesystem (what a ploop clone
// is) mounts next to its source; without nouuid the kernel refuses it.
func testXFSCloneNouuid(t *testing.T) {
	m := New(testLogger(t))
	dir := t.TempDir()
	a := loopFile(t, filepath.Join(dir, "a.img"), 320)
	ta := filepath.Join(dir, "a")
	if err := m.FormatAndMount(a, ta, XFS, nil, nil); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, ta)
	if err := os.WriteFile(filepath.Join(ta, "f"), []byte("from a"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "sync")
	if err := m.Unmount(ta); err != nil {
		t.Fatal(err)
	}
	run(t, "cp", "--sparse=always", filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img"))
	b := loopFile(t, filepath.Join(dir, "b.img"), 0)
	// The source mounted the plain way (a mount with nouuid does not
	// register its UUID): the kernel refuses the clone without nouuid.
	os.Mkdir(ta, 0o755)
	if err := unix.Mount(a, ta, "xfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain")
	os.Mkdir(plain, 0o755)
	if err := unix.Mount(b, plain, "xfs", 0, ""); err == nil {
		unix.Unmount(plain, 0)
		t.Fatal("the kernel mounted an xfs clone with a duplicate UUID without nouuid; the workaround is untested")
	}
	tb := filepath.Join(dir, "b")
	if err := m.FormatAndMount(b, tb, XFS, nil, nil); err != nil {
		t.Fatalf("clone next to its source: %v", err)
	}
	cleanupUnmount(t, tb)
	if got, err := os.ReadFile(filepath.Join(tb, "f")); err != nil || string(got) != "from a" {
		t.Fatalf("clone's file: %q, %v", got, err)
	}
	if mi := mustMounted(t, tb); !slices.Contains(mi.Options, "nouuid") {
		t.Fatalf("xfs mounted without nouuid: %v", mi.Options)
	}
	for _, p := range []string{ta, tb} {
		if err := m.Unmount(p); err != nil {
			t.Fatal(err)
		}
	}
}

// testBindMounts: a directory bound read-write and read-only within one
// filesystem (where a stat cannot see the mount point), a device node
// bound onto a file, a mount stacked twice; Unmount undoes each and
// removes the target.
func testBindMounts(t *testing.T) {
	m := New(testLogger(t))
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.Mkdir(src, 0o755)
	os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644)
	rw, ro := filepath.Join(dir, "rw"), filepath.Join(dir, "ro")
	if err := m.BindMount(src, rw, false, nil); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, rw)
	if err := m.BindMount(src, ro, true, []string{"nosuid"}); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, ro)
	if err := os.WriteFile(filepath.Join(rw, "g"), []byte("y"), 0o644); err != nil {
		t.Fatalf("write through the read-write bind: %v", err)
	}
	if err := os.WriteFile(filepath.Join(ro, "h"), []byte("z"), 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write through the read-only bind: %v, want EROFS", err)
	}
	mi := mustMounted(t, ro)
	if !slices.Contains(mi.Options, "ro") || !slices.Contains(mi.Options, "nosuid") || !strings.HasSuffix(mi.Root, "/src") {
		t.Fatalf("read-only bind: %+v", mi)
	}
	for _, p := range []string{rw, ro} {
		if mounted, err := m.IsMountPoint(p); err != nil || !mounted {
			t.Fatalf("IsMountPoint(%s) = %t, %v", p, mounted, err)
		}
	}

	dev := newLoop(t, 8)
	run(t, "sh", "-c", "printf blockdata > "+dev)
	file := filepath.Join(dir, "block")
	if err := m.BindMount(dev, file, false, nil); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, file)
	got := make([]byte, 9)
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(got, 0)
	f.Close()
	if err != nil || string(got) != "blockdata" {
		t.Fatalf("read through the device bound onto a file: %q, %v", got, err)
	}
	if st, err := os.Stat(file); err != nil || st.Mode()&os.ModeDevice == 0 {
		t.Fatalf("target is not the device node: %v", err)
	}
	if err := m.BindMount(filepath.Join(src, "f"), filepath.Join(dir, "x"), false, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("bind of a regular file: %v", err)
	}
	// A second mount on the same target.
	if err := m.BindMount(src, rw, false, nil); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{rw, ro, file} {
		if err := m.Unmount(p); err != nil {
			t.Fatalf("unmount %s: %v", p, err)
		}
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s left after Unmount: %v", p, err)
		}
	}
	if _, err := os.Stat(filepath.Join(src, "g")); err != nil {
		t.Fatalf("source changed by unmounting its binds: %v", err)
	}
}

// testGrow: the device grows under a mounted filesystem; Grow resizes it
// and the filesystem reports the new size; a repeat changes nothing.
func testGrow(t *testing.T, fstype string, mib int) {
	m := New(testLogger(t))
	img := filepath.Join(t.TempDir(), "disk.img")
	dev := loopFile(t, img, mib)
	target := filepath.Join(t.TempDir(), "mnt")
	if err := m.FormatAndMount(dev, target, fstype, nil, nil); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, target)
	before, err := Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	fsBefore, err := FilesystemSize(dev, target, fstype)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, int64(2*mib)<<20); err != nil {
		t.Fatal(err)
	}
	run(t, "losetup", "--set-capacity", dev)
	devSize, err := DeviceSize(dev)
	if err != nil || devSize != int64(2*mib)<<20 {
		t.Fatalf("device size %d, %v", devSize, err)
	}
	for i := range 2 {
		if err := m.Grow(dev, target); err != nil {
			t.Fatalf("grow #%d: %v", i+1, err)
		}
	}
	after, err := Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	fsAfter, err := FilesystemSize(dev, target, fstype)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: filesystem %d -> %d bytes (device %d, slack %d); statfs total %d -> %d", fstype, fsBefore.Bytes, fsAfter.Bytes, devSize, fsAfter.Slack, before.TotalBytes, after.TotalBytes)
	if fsAfter.Bytes < devSize-fsAfter.Slack || fsAfter.Bytes > devSize {
		t.Fatalf("filesystem has %d bytes on a %d-byte device", fsAfter.Bytes, devSize)
	}
	if after.TotalBytes-before.TotalBytes < (devSize-fsBefore.Bytes)*9/10 {
		t.Fatalf("statfs grew by %d bytes, the device by %d", after.TotalBytes-before.TotalBytes, devSize-fsBefore.Bytes)
	}
	if err := m.Unmount(target); err != nil {
		t.Fatal(err)
	}
}

// testTrimFreeze: FITRIM discards the free space of a filesystem whose
// file was deleted; FIFREEZE/FITHAW pair up, and a thaw of a filesystem
// that is not frozen succeeds.
func testTrimFreeze(t *testing.T) {
	m := New(testLogger(t))
	dev := newLoop(t, 64)
	target := filepath.Join(t.TempDir(), "mnt")
	if err := m.FormatAndMount(dev, target, Ext4, nil, nil); err != nil {
		t.Fatal(err)
	}
	cleanupUnmount(t, target)
	run(t, "dd", "if=/dev/urandom", "of="+filepath.Join(target, "big"), "bs=1M", "count=16", "conv=fsync", "status=none")
	if err := os.Remove(filepath.Join(target, "big")); err != nil {
		t.Fatal(err)
	}
	run(t, "sync")
	n, err := Trim(target)
	if err != nil {
		t.Fatal(err)
	}
	if n < 16<<20 {
		t.Fatalf("trim discarded %d bytes after deleting 16 MiB", n)
	}
	if err := Freeze(target); err != nil {
		t.Fatal(err)
	}
	if err := Freeze(target); err == nil {
		t.Fatal("a frozen filesystem froze again")
	}
	for i := range 2 {
		if err := Thaw(target); err != nil {
			t.Fatalf("thaw #%d: %v", i+1, err)
		}
	}
	if err := os.WriteFile(filepath.Join(target, "after"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(target); err != nil {
		t.Fatal(err)
	}
}

// waitExt4Errors reads Ext4Errors of dev until it is not zero or ctx ends.
func waitExt4Errors(ctx context.Context, dev string) (int64, error) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		n, err := Ext4Errors(dev)
		if err != nil || n > 0 {
			return n, err
		}
		select {
		case <-ctx.Done():
			return n, ctx.Err()
		case <-tick.C:
		}
	}
}
