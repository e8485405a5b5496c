package ublk_test

// Kernel-facing tests: one VM booting Debian's 6.12 kernel (the default
// 6.1 has no ublk_drv), every case in it against the real ublk driver.

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

const helperEnv = "PLOOP_CSI_UBLK_HELPER"

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(helperMain(mode))
	}
	os.Exit(m.Run())
}

func TestKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Kernel: vmtest.Kernel612, Timeout: 15 * time.Minute}, []vmtest.Case{
		{Name: "Control", Run: testControl},
		{Name: "RawConcurrentVerify", Run: func(t *testing.T) {
			for _, c := range []struct {
				inline    bool
				blockSize int
			}{{false, 512}, {true, 4096}} {
				t.Run(fmt.Sprintf("inline=%v,block=%d", c.inline, c.blockSize), func(t *testing.T) {
					testRawConcurrentVerify(t, c.inline, c.blockSize)
				})
			}
		}},
		{Name: "PloopExt4", Run: testPloopExt4},
		{Name: "RecoverAfterKill", Run: testRecoverAfterKill},
		{Name: "RemoveDeadServer", Run: testRemoveDeadServer},
		{Name: "RecoverPloopExt4", Run: testRecoverPloopExt4},
		{Name: "PanicIsolation", Run: testPanicIsolation},
		{Name: "DeleteWaitsAlone", Run: testDeleteWaitsAlone},
		{Name: "SelfTestSweeps", Run: testSelfTestSweeps},
	})
}

func openControl(t *testing.T) *ublk.Control {
	t.Helper()
	c, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func create(t *testing.T, c *ublk.Control, b ublk.Backend, opts ublk.Options) *ublk.Device {
	t.Helper()
	d, err := ublk.Create(c, b, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	st, err := os.Stat(d.Path())
	if err != nil || st.Mode()&os.ModeDevice == 0 || st.Mode()&os.ModeCharDevice != 0 {
		// A missing node would let a writer create a regular file there.
		t.Fatalf("%s is not a block device: %v %v", d.Path(), st, err)
	}
	return d
}

// closeGone closes d and checks that nothing of it is left in the kernel.
func closeGone(t *testing.T, c *ublk.Control, d *ublk.Device) {
	t.Helper()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Err(); err != nil {
		t.Errorf("device served with an error: %v", err)
	}
	name := filepath.Base(d.Path())
	for _, p := range []string{d.Path(), d.CharPath(), "/sys/block/" + name} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there after Close: %v", p, err)
		}
	}
	if _, err := c.Info(d.ID()); !errors.Is(err, unix.ENODEV) {
		t.Errorf("Info of a deleted device: %v, want ENODEV", err)
	}
}

func testControl(t *testing.T) {
	c := openControl(t)
	f, err := c.Features()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ublk features %#x (online resize: %v)", f, f&ublk.FlagUpdateSize != 0)
	if f&(ublk.FlagUserRecovery|ublk.FlagUserRecoveryReissue) != ublk.FlagUserRecovery|ublk.FlagUserRecoveryReissue {
		t.Errorf("features %#x lack user recovery with reissue", f)
	}
	if err := c.Delete(1 << 20); !errors.Is(err, unix.ENODEV) {
		t.Errorf("delete of a device that does not exist: %v, want ENODEV", err)
	}
	raw := rawFile(t, 8<<20)
	d := create(t, c, raw, ublk.Options{Queues: 2, Depth: 8})
	info, err := c.Info(d.ID())
	if err != nil {
		t.Fatal(err)
	}
	if info.State != ublk.StateLive || info.Queues != 2 || info.Depth != 8 || info.ServerPID != int32(os.Getpid()) {
		t.Errorf("info %+v: want live, 2 queues of 8, served by %d", info, os.Getpid())
	}
	if got := strings.TrimSpace(testcmd.Combined(t, "blockdev", "--getsize64", d.Path())); got != "8388608" {
		t.Errorf("size %s, want 8388608", got)
	}
	closeGone(t, c, d)
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// panicky panics on a read of its second MiB.
type panicky struct{ ublk.Backend }

func (p panicky) ReadAt(b []byte, off int64) (int, error) {
	if off >= 1<<20 && off < 2<<20 {
		panic("injected")
	}
	return p.Backend.ReadAt(b, off)
}

// panickyMapper panics where panicky does, but in MapRead: on the queue's
// own thread.
type panickyMapper struct{ *ploop.Raw }

func (p panickyMapper) MapRead(b []byte, off int64) (*os.File, int64, func(), bool) {
	if off >= 1<<20 && off < 2<<20 {
		panic("injected")
	}
	return p.Raw.MapRead(b, off)
}

// testPanicIsolation: a backend's panic, in ReadAt or in MapRead, fails
// its own device (that request and every later one: the backend's state
// may be half changed) and is recorded in Err; another device of the same
// process keeps serving, and both close cleanly.
func testPanicIsolation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		backend func() ublk.Backend
	}{
		{"ReadAt", func() ublk.Backend { return panicky{rawFile(t, 4<<20)} }},
		{"MapRead", func() ublk.Backend { return panickyMapper{rawFile(t, 4<<20)} }},
	} {
		t.Run(tc.name, func(t *testing.T) { testPanicIsolationOf(t, tc.backend()) })
	}
}

func testPanicIsolationOf(t *testing.T, backend ublk.Backend) {
	c := openControl(t)
	bad := create(t, c, backend, ublk.Options{Queues: 1, Depth: 4})
	good := create(t, c, rawFile(t, 4<<20), ublk.Options{Queues: 1, Depth: 4})
	buf := alignedBuf(t, 4096)
	rw := func(d *ublk.Device, write bool, off int64) error {
		f, err := os.OpenFile(d.Path(), os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if write {
			_, err = f.WriteAt(buf, off)
		} else {
			_, err = f.ReadAt(buf, off)
		}
		return err
	}
	if err := rw(bad, false, 0); err != nil {
		t.Fatalf("read before the panic: %v", err)
	}
	if err := rw(bad, false, 1<<20); !errors.Is(err, unix.EIO) {
		t.Fatalf("read that panics: %v, want EIO", err)
	}
	if err := rw(bad, true, 0); !errors.Is(err, unix.EIO) {
		t.Fatalf("write after the panic: %v, want EIO", err)
	}
	if err := bad.Err(); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("Err after the panic: %v", err)
	}
	for i := range 3 {
		if err := rw(good, i%2 == 0, int64(i)<<20); err != nil {
			t.Fatalf("the other device, request %d: %v", i, err)
		}
	}
	if good.Err() != nil {
		t.Fatalf("the other device's Err: %v", good.Err())
	}
	if err := bad.Close(); err != nil {
		t.Fatalf("Close of the failed device: %v", err)
	}
	if _, err := c.Info(bad.ID()); !errors.Is(err, unix.ENODEV) {
		t.Fatalf("the failed device after Close: %v, want ENODEV", err)
	}
	closeGone(t, c, good)
}

// testDeleteWaitsAlone: a device whose block device someone still holds
// open is not deleted until it is let go, and meanwhile the same Control
// creates, serves and deletes other devices: one held volume must not
// stall every other volume's stage and unstage.
func testDeleteWaitsAlone(t *testing.T) {
	c := openControl(t)
	held := create(t, c, rawFile(t, 4<<20), ublk.Options{Queues: 1, Depth: 4})
	f, err := os.Open(held.Path())
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- held.Close() }()
	// STOP_DEV done: Close has gone on to let go of the queues and wait
	// in DEL_DEV.
	deadline := time.Now().Add(30 * time.Second)
	for {
		info, err := c.Info(held.ID())
		if err == nil && info.State == ublk.StateDead {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the held device did not stop: %+v, %v", info, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i := range 2 {
		other := create(t, c, rawFile(t, 4<<20), ublk.Options{Queues: 1, Depth: 4})
		testcmd.Combined(t, "dd", "if=/dev/zero", "of="+other.Path(), "bs=64k", "count=16", "oflag=direct")
		closeGone(t, c, other)
		t.Logf("device %d created, written and deleted while /dev/ublkb%d is held", i+1, held.ID())
	}
	select {
	case err := <-closed:
		t.Fatalf("Close of a device held open returned at once: %v", err)
	default:
	}
	f.Close()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Close did not return within a minute of the device being let go")
	}
	if _, err := c.Info(held.ID()); !errors.Is(err, unix.ENODEV) {
		t.Fatalf("Info after the delete: %v, want ENODEV", err)
	}
}

func rawFile(t *testing.T, size int64) *ploop.Raw {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	r, err := ploop.OpenRaw(p, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// alignedBuf is memory O_DIRECT accepts.
func alignedBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// testRawConcurrentVerify: eight writers at once, each in a region of its
// own, with direct I/O of 4 KiB to 256 KiB; then everything read back
// through the device, a discard, and the backing file compared after Close.
func testRawConcurrentVerify(t *testing.T, inline bool, blockSize int) {
	const size, writers = 64 << 20, 8
	c := openControl(t)
	raw := rawFile(t, size)
	d := create(t, c, raw, ublk.Options{Queues: 2, Depth: 32, Inline: inline, BlockSize: blockSize})
	if got := strings.TrimSpace(testcmd.Combined(t, "blockdev", "--getss", d.Path())); got != strconv.Itoa(blockSize) {
		t.Fatalf("logical block size %s, want %d", got, blockSize)
	}
	model := make([]byte, size)
	dev, err := os.OpenFile(d.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	region := size / writers
	for w := range writers {
		buf := alignedBuf(t, 256<<10)
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			for range 150 {
				n := (1 + r.IntN(64)) << 12
				off := w*region + r.IntN((region-n)>>12+1)<<12
				for i := range buf[:n] {
					buf[i] = byte(r.Uint32())
				}
				if _, err := dev.WriteAt(buf[:n], int64(off)); err != nil {
					errs <- err
					return
				}
				copy(model[off:], buf[:n])
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("write: %v", err)
	}
	if err := dev.Sync(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	compare := func(what string) {
		t.Helper()
		buf := alignedBuf(t, 1<<20)
		for off := 0; off < size; off += len(buf) {
			if _, err := dev.ReadAt(buf, int64(off)); err != nil {
				t.Fatalf("%s: read at %d: %v", what, off, err)
			}
			if !bytes.Equal(buf, model[off:off+len(buf)]) {
				t.Fatalf("%s: the device differs from what was written in the MiB at %d", what, off)
			}
		}
	}
	compare("after concurrent writes")

	rng := [2]uint64{4 << 20, 2 << 20}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, dev.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&rng[0]))); errno != 0 {
		t.Fatalf("BLKDISCARD: %v", errno)
	}
	clear(model[rng[0] : rng[0]+rng[1]])
	compare("after a discard")
	dev.Close()
	// ploop.Raw is a FileMapper: its reads and writes are the ring's.
	if d.Placed() == 0 {
		t.Fatal("no request was placed in the file: the queues' rings did no I/O of their own")
	}

	closeGone(t, c, d)
	got, err := os.ReadFile(raw.Path())
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(model) {
		t.Fatal("the backing file differs from what was written")
	}
}

// testPloopExt4: ext4 on a ploop image served through ublk, its data
// intact after the device is gone and the image served again.
func testPloopExt4(t *testing.T) {
	c := openControl(t)
	path := filepath.Join(t.TempDir(), "root.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	d := create(t, c, img, ublk.Options{})
	testcmd.Combined(t, "mkfs.ext4", "-q", d.Path())
	mnt := t.TempDir()
	testcmd.Combined(t, "mount", d.Path(), mnt)
	data := make([]byte, 24<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "umount", mnt)
	testcmd.Combined(t, "fsck.ext4", "-fn", d.Path())
	closeGone(t, c, d)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "qemu-img", "check", "-f", "parallels", path)

	img, err = ploop.Open(path, ploop.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	d = create(t, c, img, ublk.Options{Queues: 1, Inline: true})
	testcmd.Combined(t, "mount", "-o", "ro", d.Path(), mnt)
	got, err := os.ReadFile(filepath.Join(mnt, "f"))
	testcmd.Combined(t, "umount", mnt)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("file after re-serving the image: %d bytes, err %v; want the %d written", len(got), err, len(data))
	}
	closeGone(t, c, d)
}
