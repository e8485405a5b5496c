package vmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// xfsMinMiB is the smallest file system mkfs.xfs makes.
const xfsMinMiB = 300

// ScratchFS makes a file system for one test inside the guest: a sparse file
// in the guest's /tmp (tmpfs) on a loop device, formatted as fstype ("ext4"
// with the quota and project features, or "xfs"), mounted with prjquota at a
// fresh directory whose path it returns. t.Cleanup unmounts it and detaches
// the loop device. xfs file systems are at least 300 MiB, mkfs.xfs's
// minimum; smaller sizes are raised to it.
func ScratchFS(t testing.TB, fstype string, sizeMiB int) string {
	t.Helper()
	mustGuest(t, "ScratchFS")
	var mkfs []string
	switch fstype {
	case "ext4":
		// The fresh sparse file reads as zeroes; saying so spares mkfs
		// the WRITE_ZEROES requests a tmpfs-backed loop device rejects.
		mkfs = []string{"mkfs.ext4", "-q", "-F", "-O", "quota,project", "-E", "assume_storage_prezeroed=1"}
	case "xfs":
		mkfs = []string{"mkfs.xfs", "-q", "-f"}
	default:
		t.Fatalf("vmtest.ScratchFS: unsupported file system %q (want ext4 or xfs)", fstype)
	}
	if sizeMiB < 1 || sizeMiB > 1<<20 {
		t.Fatalf("vmtest.ScratchFS: size %d MiB out of range", sizeMiB)
	}
	if fstype == "xfs" && sizeMiB < xfsMinMiB {
		sizeMiB = xfsMinMiB // the file is sparse: the extra space costs nothing
	}
	dir, err := os.MkdirTemp("/tmp", "scratch-"+fstype+"-")
	if err != nil {
		t.Fatalf("vmtest.ScratchFS: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// Quota tests write as UnprivilegedUID below the mount point.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatalf("vmtest.ScratchFS: %v", err)
	}
	img := filepath.Join(dir, "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatalf("vmtest.ScratchFS: %v", err)
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("vmtest.ScratchFS: size %s: %v", img, err)
	}

	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("vmtest.ScratchFS: %v", fmtErr("losetup "+img, err, out))
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("vmtest.ScratchFS cleanup: %v", fmtErr("losetup --detach "+dev, err, out))
		}
	})
	if out, err := exec.Command(mkfs[0], append(mkfs[1:], dev)...).CombinedOutput(); err != nil {
		t.Fatalf("vmtest.ScratchFS: %v", fmtErr(strings.Join(mkfs, " ")+" "+dev, err, out))
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatalf("vmtest.ScratchFS: %v", err)
	}
	if err := syscall.Mount(dev, mnt, fstype, 0, "prjquota"); err != nil {
		t.Fatalf("vmtest.ScratchFS: mount %s (%s) on %s with prjquota: %v", dev, fstype, mnt, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(mnt, 0); err != nil {
			t.Errorf("vmtest.ScratchFS cleanup: unmount %s: %v", mnt, err)
		}
	})
	return mnt
}
