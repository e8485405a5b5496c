// Package e2e holds end-to-end tests that need a real kernel with nbd and
// project quota; they run inside the vmtest VM.
package e2e

import (
	"errors"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestKernel boots one VM and proves the kernel paths the driver depends on,
// with the reference tools, before the driver's own code uses them.
func TestKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{}, []vmtest.Case{
		{Name: "QemuNBDParallelsExt4", Run: testQemuNBDParallelsExt4},
		{Name: "ProjectQuotaExt4", Run: func(t *testing.T) { testProjectQuota(t, "ext4", 64, syscall.EDQUOT, true) }},
		// XFS differs from the expectation in two ways, both the
		// kernel's behaviour: it reports an exhausted project quota as
		// ENOSPC (to the writer a project is a smaller file system), and it
		// enforces hard limits on root too (no CAP_SYS_RESOURCE exemption).
		{Name: "ProjectQuotaXFS", Run: func(t *testing.T) { testProjectQuota(t, "xfs", 300, syscall.ENOSPC, false) }},
	})
}

// testQemuNBDParallelsExt4: a parallels image served by qemu-nbd through the
// kernel nbd driver takes ext4 and a file, and stays clean for qemu-img check.
func testQemuNBDParallelsExt4(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.hds")
	testcmd.Run(t, "qemu-img", "create", "-q", "-f", "parallels", img, "256M")

	const dev = "/dev/nbd0"
	// -v keeps qemu-nbd in the foreground so the test owns and reaps it.
	srv := exec.Command("qemu-nbd", "-v", "--format=parallels", "--connect="+dev, img)
	srv.Stdout, srv.Stderr = testWriter{t, "qemu-nbd: "}, testWriter{t, "qemu-nbd: "}
	if err := srv.Start(); err != nil {
		t.Fatalf("start qemu-nbd: %v", err)
	}
	exited := make(chan struct{})
	var srvErr error
	go func() { srvErr = srv.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			exec.Command("qemu-nbd", "--disconnect", dev).Run()
			srv.Process.Kill()
			<-exited
		}
	})
	testcmd.WaitFor(t, 30*time.Second, "nbd0 connected with 256 MiB", func() (bool, error) {
		select {
		case <-exited:
			return false, fmt.Errorf("qemu-nbd exited before connecting: %v", srvErr)
		default:
		}
		// The pid file appears on connect, the size a moment later.
		if _, err := os.Stat("/sys/block/nbd0/pid"); err != nil {
			return false, nil
		}
		size, err := os.ReadFile("/sys/block/nbd0/size")
		return err == nil && strings.TrimSpace(string(size)) == strconv.Itoa(256<<20/512), nil
	})

	testcmd.Run(t, "mkfs.ext4", "-q", "-F", dev)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		t.Fatalf("mount %s: %v", dev, err)
	}
	data := []byte(strings.Repeat("ploop-csi kernel nbd path\n", 40000)) // ~1 MiB
	if err := os.WriteFile(filepath.Join(mnt, "file"), data, 0o644); err != nil {
		t.Fatalf("write through nbd: %v", err)
	}
	if err := syscall.Unmount(mnt, 0); err != nil {
		t.Fatalf("unmount: %v", err)
	}
	testcmd.Run(t, "qemu-nbd", "--disconnect", dev)
	select {
	case <-exited:
		if srvErr != nil {
			t.Fatalf("qemu-nbd after disconnect: %v", srvErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("qemu-nbd still running 30s after disconnect")
	}

	out := testcmd.Run(t, "qemu-img", "check", "-f", "parallels", img)
	if !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check: %s", out)
	}
	// The file system is really in the image: read it back without the kernel.
	testcmd.Run(t, "qemu-img", "convert", "-f", "parallels", "-O", "raw", img, filepath.Join(dir, "disk.raw"))
	out = testcmd.Run(t, "debugfs", "-R", "cat /file", filepath.Join(dir, "disk.raw"))
	if out != string(data) {
		t.Fatalf("file read back from the image differs (%d bytes, want %d)", len(out), len(data))
	}
}

// testProjectQuota: a 5 MiB project hard limit stops an unprivileged writer
// near 5 MiB with the file system's quota error (wantErr). Root, holding
// CAP_SYS_RESOURCE, writes past the limit where the file system exempts it
// (rootExempt) and gets wantErr too where it does not.
func testProjectQuota(t *testing.T, fstype string, sizeMiB int, wantErr syscall.Errno, rootExempt bool) {
	mnt := vmtest.ScratchFS(t, fstype, sizeMiB)
	const projID = 4242
	const limit = 5 << 20
	dir := filepath.Join(mnt, "vol")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, vmtest.UnprivilegedUID, vmtest.UnprivilegedGID); err != nil {
		t.Fatal(err)
	}
	testcmd.Run(t, "chattr", "+P", "-p", strconv.Itoa(projID), dir)
	testcmd.Run(t, "setquota", "-P", strconv.Itoa(projID), "0", strconv.Itoa(limit/1024), "0", "0", mnt)

	written, err := writeAsUnprivileged(t, filepath.Join(dir, "user.dat"), 10<<20)
	if !errors.Is(err, wantErr) {
		t.Fatalf("unprivileged write of 10 MiB: wrote %d bytes, err %v; want %v", written, err, wantErr)
	}
	if written < limit-(1<<20) || written > limit {
		t.Fatalf("unprivileged writer stopped after %d bytes, want near the %d-byte limit", written, limit)
	}
	t.Logf("%s: unprivileged writer got %q after %d bytes", fstype, err, written)

	n, err := writeFile(filepath.Join(dir, "root.dat"), 10<<20)
	switch {
	case rootExempt && err != nil:
		t.Fatalf("root write of 10 MiB over the project limit: wrote %d bytes: %v (root has CAP_SYS_RESOURCE, which %s exempts from quota)", n, err, fstype)
	case !rootExempt && !errors.Is(err, wantErr):
		t.Fatalf("root write of 10 MiB over the project limit: wrote %d bytes, err %v; %s limits root too, want %v", n, err, fstype, wantErr)
	}
	t.Logf("%s: root wrote %d bytes past the limit, err %v", fstype, n, err)
	out := testcmd.Run(t, "repquota", "-P", "-n", mnt)
	if !strings.Contains(out, "#"+strconv.Itoa(projID)) {
		t.Fatalf("repquota does not list project %d:\n%s", projID, out)
	}
}

// writeAsUnprivileged re-executes this test binary as vmtest.UnprivilegedUID
// to write n bytes to path; it returns what the child wrote and its error.
func writeAsUnprivileged(t *testing.T, path string, n int) (int, error) {
	t.Helper()
	cmd := testcmd.Child("TestWriterHelper", "E2E_WRITER_PATH="+path, "E2E_WRITER_SIZE="+strconv.Itoa(n))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: vmtest.UnprivilegedUID, Gid: vmtest.UnprivilegedGID}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("unprivileged writer: %v\n%s", err, out)
	}
	// The child reports "written=N errno=E".
	var written, errno int
	for _, line := range strings.Split(string(out), "\n") {
		if _, err := fmt.Sscanf(line, "written=%d errno=%d", &written, &errno); err == nil {
			if errno == 0 {
				return written, nil
			}
			return written, syscall.Errno(errno)
		}
	}
	t.Fatalf("unprivileged writer gave no result:\n%s", out)
	return 0, nil
}

// TestWriterHelper is the child side of writeAsUnprivileged; without its
// environment it does nothing.
func TestWriterHelper(t *testing.T) {
	path := os.Getenv("E2E_WRITER_PATH")
	if path == "" {
		return
	}
	size, err := strconv.Atoi(os.Getenv("E2E_WRITER_SIZE"))
	if err != nil {
		t.Fatal(err)
	}
	n, err := writeFile(path, size)
	errno := 0
	var en syscall.Errno
	if errors.As(err, &en) {
		errno = int(en)
	} else if err != nil {
		t.Fatalf("write: %v", err)
	}
	fmt.Printf("written=%d errno=%d\n", n, errno)
}

// writeFile writes size bytes in 64 KiB chunks and syncs, returning how much
// the kernel accepted (quota is charged at write or at writeback).
func writeFile(path string, size int) (int, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i)
	}
	written := 0
	for written < size {
		n, err := f.Write(buf[:min(len(buf), size-written)])
		written += n
		if err != nil {
			return written, err
		}
	}
	if err := f.Sync(); err != nil {
		return written, err
	}
	return written, f.Close()
}

// testWriter logs a child's output lines through t.
type testWriter struct {
	t      *testing.T
	prefix string
}

func (w testWriter) Write(p []byte) (int, error) {
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		w.t.Log(w.prefix + l)
	}
	return len(p), nil
}
