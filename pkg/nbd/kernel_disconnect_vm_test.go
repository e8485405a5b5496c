package nbd_test

// Disconnects by someone else of a device that is still held open: the
// kernel keeps such a device's configuration (STATUS says connected) until
// the last opener closes it, but shuts its sockets down at once. Cases of
// TestKernel (kernel_vm_test.go).

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"golang.org/x/sys/unix"
)

// promptly bounds what must not wait for anything but the kernel: on the
// code before the fix these waits ran into it.
const promptly = 20 * time.Second

// testDisconnectWhileMounted: an admin (or `ploopctl detach` falling back
// to netlink) disconnects a device whose filesystem is mounted. Disconnect
// returns although the mount keeps the device configured; the attachment
// reports Gone after one refused RECONFIGURE instead of retrying forever;
// I/O on the filesystem fails with EIO instead of hanging; after the
// unmount the index is free for a new attachment, which the old
// attachment's Disconnect then leaves alone.
func testDisconnectWhileMounted(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "mounted.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(128 << 20); err != nil {
		t.Fatal(err)
	}
	k := openKernel(t)
	const id = "test-disconnect-mounted"
	att := attach(t, k, growFile{f}, id)
	index := att.Index()
	testcmd.Combined(t, "mkfs.ext4", "-q", att.Path())
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	mount(t, att.Path(), mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			unix.Unmount(mnt, 0)
		}
	})
	kept := pattern(40, 1<<20)
	if err := writeSynced(filepath.Join(mnt, "kept"), kept); err != nil {
		t.Fatal(err)
	}

	// A live device whose sockets are all healthy declines a fresh one,
	// without an error: that answer must never be read as "gone".
	if ok, err := nbd.OfferSocket(att); ok || err != nil {
		t.Fatalf("a fresh socket offered to a healthy device: taken %v, err %v; want declined without an error", ok, err)
	}
	select {
	case <-att.Gone():
		t.Fatal("Gone closed for a live device")
	default:
	}

	mark := kernelLogMark()
	admin, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	start := time.Now()
	for i := 0; i < 2; i++ { // the second one finds it disconnected and held
		ctx, cancel := context.WithTimeout(context.Background(), promptly)
		err := admin.Disconnect(ctx, index)
		cancel()
		if err != nil {
			t.Errorf("Disconnect %d of the mounted device: %v (after %v)", i+1, err, time.Since(start))
		} else {
			t.Logf("Disconnect %d of the mounted device returned after %v", i+1, time.Since(start).Round(time.Millisecond))
		}
	}
	if ok, err := k.Status(index); err != nil || !ok {
		t.Errorf("Status of the disconnected device while mounted = %v, %v; the kernel keeps its configuration while the mount holds it", ok, err)
	}
	select {
	case <-att.Gone():
		t.Logf("Gone closed %v after the disconnect", time.Since(start).Round(time.Millisecond))
	case <-time.After(promptly):
		t.Errorf("Gone not closed %v after someone else disconnected the device", promptly)
	}

	// I/O on the mounted filesystem fails at once.
	ioDone := make(chan error, 1)
	go func() { ioDone <- directRead(filepath.Join(mnt, "kept"), nil) }()
	select {
	case err := <-ioDone:
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("read on the disconnected device: %v, want EIO", err)
		}
	case <-time.After(promptly):
		t.Fatal("a read on the disconnected device hangs")
	}
	go func() { ioDone <- writeSynced(filepath.Join(mnt, "after"), pattern(41, 64<<10)) }()
	select {
	case err := <-ioDone:
		if err == nil {
			t.Error("a synced write on the disconnected device succeeded")
		}
		t.Logf("a synced write on the disconnected device: %v", err)
	case <-time.After(promptly):
		t.Fatal("a synced write on the disconnected device hangs")
	}
	if n := strings.Count(kernelLog(att.Path(), mark), "not configured, cannot reconfigure"); n != 1 {
		t.Errorf("the kernel refused %d RECONFIGUREs for the disconnected device; want 1: the attachment stops at the first", n)
	}

	umount(t, mnt)
	mounted = false
	if ok, err := k.Status(index); err != nil || ok {
		t.Errorf("after the unmount: Status = %v, %v; want released", ok, err)
	}
	if _, err := nbd.FindBackend(id); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after the unmount the backend is still listed: %v", err)
	}

	// The index is free again; a new attachment takes it and the data
	// synced before the disconnect is there.
	srv, err := nbd.NewServer(nbd.Export{Name: id, Backend: growFile{f}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	att2, err := k.Connect(ctx, srv, nbd.AttachOptions{BackendID: id, Index: index})
	if err != nil {
		t.Fatalf("connect to %s again after the unmount: %v", nbd.DevicePath(index), err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := att2.Disconnect(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	mount(t, att2.Path(), mnt)
	mounted = true
	if got, err := os.ReadFile(filepath.Join(mnt, "kept")); err != nil || !bytes.Equal(got, kept) {
		t.Fatalf("the file synced before the disconnect: %d bytes, %v", len(got), err)
	}

	// The first attachment's device is gone; its index now belongs to
	// att2, which its Disconnect must not touch.
	dctx, dcancel := context.WithTimeout(context.Background(), promptly)
	defer dcancel()
	if err := att.Disconnect(dctx); err != nil {
		t.Errorf("Disconnect of the gone attachment: %v", err)
	}
	if ok, err := k.Status(index); err != nil || !ok {
		t.Fatalf("after the gone attachment's Disconnect: Status = %v, %v; it disconnected its successor", ok, err)
	}
	dropCaches(t)
	if err := directRead(filepath.Join(mnt, "kept"), kept); err != nil {
		t.Fatalf("the new attachment after the old one's Disconnect: %v", err)
	}
	umount(t, mnt)
	mounted = false
	disconnect(t, att2)
	if ok, err := k.Status(index); err != nil || ok {
		t.Errorf("after the last Disconnect: Status = %v, %v; want released", ok, err)
	}
}

// testReattachAfterDisconnect: a successor process looks for a device
// that was disconnected while held open. Its backend file is still there
// (the kernel keeps the configuration for the opener), but no socket slot
// will ever free up: Reattach fails with ErrDisconnected at once instead
// of waiting for its context.
func testReattachAfterDisconnect(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "held.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(16 << 20); err != nil {
		t.Fatal(err)
	}
	k := openKernel(t)
	const id = "test-reattach-disconnected"
	srv, err := nbd.NewServer(nbd.Export{Name: id, Backend: growFile{f}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	att, err := k.Connect(ctx, srv, nbd.AttachOptions{BackendID: id, Index: nbd.AnyDevice})
	if err != nil {
		t.Fatal(err)
	}
	// An open descriptor holds the device as a mount does; opened while
	// served, so that nothing the open reads waits for a dead link.
	holder, err := os.Open(att.Path())
	if err != nil {
		att.Disconnect(ctx)
		t.Fatal(err)
	}
	defer holder.Close()
	att.Release() // what a serving process does before a restart

	dctx, dcancel := context.WithTimeout(context.Background(), promptly)
	defer dcancel()
	start := time.Now()
	if err := k.Disconnect(dctx, att.Index()); err != nil {
		t.Errorf("Disconnect of the held device: %v (after %v)", err, time.Since(start))
	}
	if i, err := nbd.FindBackend(id); err != nil || i != att.Index() {
		t.Fatalf("FindBackend of the held device = %d, %v; the kernel keeps the backend file while it is held", i, err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), promptly)
	defer rcancel()
	start = time.Now()
	att2, err := k.Reattach(rctx, srv, nbd.AttachOptions{BackendID: id, Index: nbd.AnyDevice})
	if err == nil {
		att2.Release()
		t.Fatal("Reattach to a disconnected device succeeded")
	}
	if !errors.Is(err, nbd.ErrDisconnected) {
		t.Fatalf("Reattach to a disconnected device: %v (after %v); want ErrDisconnected", err, time.Since(start))
	}
	t.Logf("Reattach to the disconnected device failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
	holder.Close()
	if ok, err := k.Status(att.Index()); err != nil || ok {
		t.Errorf("after the last close: Status = %v, %v; want released", ok, err)
	}
}

// directRead reads the first len(want) bytes of path (4 KiB when want is
// nil) past the page cache and compares them with want.
func directRead(path string, want []byte) error {
	n := max(len(want), 4096)
	file, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer file.Close()
	buf, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	if _, err := file.ReadAt(buf, 0); err != nil {
		return err
	}
	if want != nil && !bytes.Equal(buf[:len(want)], want) {
		return errors.New("content differs")
	}
	return nil
}
