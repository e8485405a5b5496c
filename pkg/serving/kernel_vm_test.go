package serving

// Kernel-facing tests of the volume lifecycle: one VM boot
// (test/e2e/vmtest) runs every case against the real nbd driver. The
// restart of a killed serving process is proved end to end, through
// `ploopctl attach --reattach`, in cmd/ploopctl (StackReattachAfterKill).

import (
	"bytes"
	"context"
	"errors"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
	"golang.org/x/sys/unix"
)

func TestKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Timeout: 10 * time.Minute}, []vmtest.Case{
		{Name: "AttachGrowClose", Run: testAttachGrowClose},
		{Name: "ReleaseReattach", Run: testReleaseReattach},
		{Name: "ReattachNoDevice", Run: testReattachNoDevice},
		{Name: "SharedServer", Run: testSharedServer},
	})
}

// testSharedServer: two volumes attached through one nbd.Server (as the
// node plugin serves them): each is its own export and device, closing one
// removes its export and leaves the other serving, and an online grow of
// the other still resizes its device.
func testSharedServer(t *testing.T) {
	srv := nbd.New(nbd.ServerOptions{})
	k := openKernel(t)
	ctx, cancel := withTimeout(2 * time.Minute)
	defer cancel()
	var vols []*Volume
	for _, id := range []string{"shared-a", "shared-b"} {
		v := open(t, newStack(t, 64<<20), OpenOptions{})
		if err := v.Attach(ctx, k, AttachOptions{BackendID: id, Server: srv}); err != nil {
			t.Fatal(err)
		}
		testcmd.Combined(t, "dd", "if=/dev/urandom", "of="+v.Device(), "bs=1M", "count=4", "oflag=direct", "status=none")
		vols = append(vols, v)
	}
	if got := srv.Exports(); len(got) != 2 {
		t.Fatalf("shared server exports %v, want two", got)
	}
	if err := vols[0].Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := srv.Exports(); len(got) != 1 || got[0] != "shared-b" {
		t.Fatalf("exports after closing the first volume: %v", got)
	}
	b := vols[1]
	testcmd.Combined(t, "dd", "if=/dev/zero", "of="+b.Device(), "bs=1M", "count=4", "seek=8", "oflag=direct", "status=none")
	if _, err := b.Grow(128 << 20); err != nil {
		t.Fatal(err)
	}
	if got := deviceBytes(t, b.Device()); got != 128<<20 {
		t.Fatalf("%s has %d bytes after Grow to 128 MiB", b.Device(), got)
	}
	if err := b.Failed(); err != nil {
		t.Fatalf("healthy volume reports failure: %v", err)
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := srv.Exports(); len(got) != 0 {
		t.Fatalf("exports after closing both volumes: %v", got)
	}
}

func openKernel(t *testing.T) *nbd.Kernel {
	t.Helper()
	k, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k
}

func withTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

func deviceBytes(t *testing.T, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/size")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n * 512
}

// testAttachGrowClose: Attach names the device by its backend id, Grow
// resizes the device with the stack (and refuses, changing nothing, a size
// the device cannot take), Gone reports a disconnect by someone else, and
// Close leaves the device free and the stack clean.
func testAttachGrowClose(t *testing.T) {
	const id = "serving-grow"
	dir := newStack(t, 64<<20)
	v := open(t, dir, OpenOptions{})
	k := openKernel(t)
	ctx, cancel := withTimeout(time.Minute)
	defer cancel()
	if err := v.Attach(ctx, k, AttachOptions{BackendID: id, Connections: 2}); err != nil {
		t.Fatal(err)
	}
	dev := v.Device()
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/backend"); err != nil || strings.TrimSpace(string(b)) != id {
		t.Fatalf("backend of %s: %q, %v", dev, b, err)
	}
	if err := v.Attach(ctx, k, AttachOptions{BackendID: id + "-2"}); err == nil {
		t.Fatal("a second Attach of the same volume succeeded")
	}
	if _, err := v.Grow(100<<20 + 512); err == nil || v.Size() != 64<<20 {
		t.Fatalf("grow of an attached volume to a size that is not whole blocks: %v, size now %d", err, v.Size())
	}
	if _, err := v.Grow(128 << 20); err != nil {
		t.Fatal(err)
	}
	if got := deviceBytes(t, dev); got != 128<<20 {
		t.Fatalf("%s has %d bytes after Grow to 128 MiB", dev, got)
	}
	testcmd.Combined(t, "mkfs.ext4", "-q", dev)

	// Someone else disconnects the device: Gone tells the owner.
	index, _ := nbd.ParseDevice(dev)
	if err := k.Disconnect(ctx, index); err != nil {
		t.Fatal(err)
	}
	select {
	case <-v.Gone():
	case <-ctx.Done():
		t.Fatal("Gone not closed after the device was disconnected")
	}
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := nbd.FindBackend(id); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("backend %s still listed after Close: %v", id, err)
	}
	if rep, err := ploop.CheckStack(dir); err != nil || !rep.Clean() {
		t.Fatalf("stack after Close: %v\n%s", err, rep)
	}
}

// testReleaseReattach: a planned restart. Release stops serving with the
// filesystem mounted and closes the stack cleanly; a new Volume opens it
// without repair and Reattach takes the device over, giving it the size
// of an offline grow made meanwhile; the filesystem never sees an error,
// and a write issued while nobody served the device completes.
func testReleaseReattach(t *testing.T) {
	const id = "serving-release"
	dir := newStack(t, 128<<20)
	v := open(t, dir, OpenOptions{})
	k := openKernel(t)
	ctx, cancel := withTimeout(2 * time.Minute)
	defer cancel()
	opts := AttachOptions{BackendID: id, Connections: 2, Timeout: 5 * time.Second, DeadConnTimeout: 60 * time.Second}
	if err := v.Attach(ctx, k, opts); err != nil {
		t.Fatal(err)
	}
	dev := v.Device()
	testcmd.Combined(t, "mkfs.ext4", "-q", dev)
	mnt := filepath.Join(t.TempDir(), "mnt")
	os.Mkdir(mnt, 0o755)
	testcmd.Combined(t, "mount", dev, mnt)
	defer unix.Unmount(mnt, unix.MNT_DETACH)
	before := pattern(0x61, 4<<20)
	if err := os.WriteFile(filepath.Join(mnt, "before"), before, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := v.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if err := v.Release(); err != nil {
		t.Fatal(err)
	}
	// While no process serves it, a write waits in the kernel.
	written := make(chan error, 1)
	after := pattern(0x62, 4<<20)
	go func() {
		f, err := os.OpenFile(filepath.Join(mnt, "after"), os.O_CREATE|os.O_WRONLY, 0o600)
		if err == nil {
			if _, err = f.Write(after); err == nil {
				err = f.Sync()
			}
			f.Close()
		}
		written <- err
	}()

	// While nobody serves it, the stack grows offline; the successor gives
	// the device the stack's size.
	if err := ploop.GrowStack(dir, 256<<20); err != nil {
		t.Fatal(err)
	}
	// Released cleanly: no repair needed.
	v2 := open(t, dir, OpenOptions{})
	if err := v2.Reattach(ctx, k, opts); err != nil {
		t.Fatal(err)
	}
	if v2.Device() != dev {
		t.Fatalf("reattached %s, want %s", v2.Device(), dev)
	}
	if got := deviceBytes(t, dev); got != 256<<20 {
		t.Fatalf("%s has %d bytes after reattaching a stack grown to 256 MiB", dev, got)
	}
	if err := <-written; err != nil {
		t.Fatalf("a write across the restart failed: %v", err)
	}
	testcmd.Combined(t, "sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
	for name, want := range map[string][]byte{"before": before, "after": after} {
		if got, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("file %s after the restart: %d bytes, %v", name, len(got), err)
		}
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "e2fsck", "-fn", dev)
	if err := v2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if rep, err := ploop.CheckStack(dir); err != nil || !rep.Clean() {
		t.Fatalf("stack after Close: %v\n%s", err, rep)
	}
}

// testReattachNoDevice: with no device for the backend id, Reattach says
// so with ErrNoDevice (the caller then attaches afresh) and the volume
// stays usable.
func testReattachNoDevice(t *testing.T) {
	v := open(t, newStack(t, 16<<20), OpenOptions{})
	k := openKernel(t)
	ctx, cancel := withTimeout(time.Minute)
	defer cancel()
	if err := v.Reattach(ctx, k, AttachOptions{BackendID: "serving-nobody"}); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Reattach with no device: %v, want ErrNoDevice", err)
	}
	if err := v.Attach(ctx, k, AttachOptions{BackendID: "serving-nobody"}); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
}
