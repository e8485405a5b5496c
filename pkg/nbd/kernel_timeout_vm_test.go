package nbd_test

// What the kernel (Debian's 6.1) does with a request slower than its
// timeout, and that neither it nor a panic in another export can corrupt
// or fail a volume. The numbers these cases log are the ones quoted in
// the package documentation.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"golang.org/x/sys/unix"
)

// holdBackend is a raw file whose first write at holdOff is held until
// release is closed; it counts the writes at holdOff that ran.
type holdBackend struct {
	growFile
	holdOff int64
	first   atomic.Bool
	held    chan struct{} // closed when the first write arrived
	release chan struct{} // closed by let
	once    sync.Once
	landed  chan struct{} // closed when the first write has run
	runs    atomic.Int64
}

// let releases the held write; any number of calls.
func (h *holdBackend) let() { h.once.Do(func() { close(h.release) }) }

func newHoldBackend(t *testing.T, size, holdOff int64) *holdBackend {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "hold.raw"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return &holdBackend{growFile: growFile{f}, holdOff: holdOff,
		held: make(chan struct{}), release: make(chan struct{}), landed: make(chan struct{})}
}

func (h *holdBackend) WriteAt(p []byte, off int64) (int, error) {
	if off == h.holdOff {
		if h.first.CompareAndSwap(false, true) {
			close(h.held)
			<-h.release
			defer close(h.landed)
		}
		defer h.runs.Add(1)
	}
	return h.growFile.WriteAt(p, off)
}

// directIO is an O_DIRECT handle on a device with an aligned buffer.
type directIO struct {
	f   *os.File
	buf []byte
}

func openDirect(t *testing.T, dev string) *directIO {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close(); unix.Munmap(buf) })
	return &directIO{f: f, buf: buf}
}

// write writes data (at most 1 MiB, 4 KiB aligned) at off; read reads n
// bytes at off.
func (d *directIO) write(data []byte, off int64) error {
	n := copy(d.buf, data)
	_, err := d.f.WriteAt(d.buf[:n], off)
	return err
}

func (d *directIO) read(n int, off int64) ([]byte, error) {
	_, err := d.f.ReadAt(d.buf[:n], off)
	return append([]byte(nil), d.buf[:n]...), err
}

// connectOpts attaches an export of srv with opts and disconnects it when
// the test ends.
func connectOpts(t *testing.T, k *nbd.Kernel, srv *nbd.Server, opts nbd.AttachOptions) *nbd.Attachment {
	t.Helper()
	opts.Index = nbd.AnyDevice
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	att, err := k.Connect(ctx, srv, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := att.Disconnect(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return att
}

// setIOTimeout sets the block layer's request timeout of a device, the
// one the kernel applies when nbd's own timeout is 0 (30 s by default).
func setIOTimeout(t *testing.T, att *nbd.Attachment, d time.Duration) {
	t.Helper()
	p := "/sys/block/" + filepath.Base(att.Path()) + "/queue/io_timeout"
	if err := os.WriteFile(p, []byte(fmt.Sprint(d.Milliseconds())), 0); err != nil {
		t.Fatal(err)
	}
}

// linkDeads counts the kernel's LINK_DEAD notifications for a device:
// each one is a connection the kernel gave up on.
type linkDeads struct {
	mu     sync.Mutex
	n      int
	signal chan struct{}
}

func watchLinkDeads(t *testing.T, att *nbd.Attachment) *linkDeads {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	events, stop, err := nbd.WatchLinkDead(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); stop() })
	ld := &linkDeads{signal: make(chan struct{}, 1)}
	go func() {
		for i := range events {
			if i == att.Index() {
				ld.mu.Lock()
				ld.n++
				ld.mu.Unlock()
				select {
				case ld.signal <- struct{}{}:
				default:
				}
			}
		}
	}()
	return ld
}

func (ld *linkDeads) count() int {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return ld.n
}

// kernelLogMark is the kernel log's length now; see kernelLog.
func kernelLogMark() int {
	out, _ := exec.Command("dmesg").Output()
	return strings.Count(string(out), "\n")
}

// kernelLog returns the kernel's messages about a device since mark.
func kernelLog(dev string, mark int) string {
	out, _ := exec.Command("dmesg").Output()
	all := strings.Split(string(out), "\n")
	var lines []string
	for _, l := range all[min(mark, len(all)):] {
		if strings.Contains(l, filepath.Base(dev)+":") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return strings.Join(lines, "\n")
}

// testSlowRequest holds one write in the server for longer than the
// kernel's timeout and records what the kernel does: whether it resends
// the write (LINK_DEAD, more than one run) and whether it fails it. The
// defaults must do neither.
func testSlowRequest(t *testing.T) {
	tests := []struct {
		name string
		opts nbd.AttachOptions
		// ioTimeout, when set, shortens the block layer's 30 s request
		// timeout so that the case is cheap; the kernel code path is the
		// same (nbd's own timeout stays as in opts).
		ioTimeout time.Duration
		hold      time.Duration
		// resends: whether the kernel is expected to give up on the
		// connection and resend.
		resends bool
	}{
		{name: "defaults", ioTimeout: time.Second, hold: 5 * time.Second},
		{name: "defaults-real-30s", hold: 40 * time.Second},
		{name: "two-connections-no-timeout", opts: nbd.AttachOptions{Connections: 2}, ioTimeout: time.Second, hold: 5 * time.Second, resends: true},
		{name: "one-connection-timeout-1s", opts: nbd.AttachOptions{Timeout: time.Second}, hold: 5 * time.Second, resends: true},
		{name: "two-connections-timeout-1s", opts: nbd.AttachOptions{Connections: 2, Timeout: time.Second}, hold: 5 * time.Second, resends: true},
	}
	k := openKernel(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "defaults-real-30s" && testing.Short() {
				t.Skip("-short: the default's 30 s block-layer timeout is exercised with a 1 s one instead")
			}
			t.Parallel()
			const off = 1 << 20
			b := newHoldBackend(t, 16<<20, off)
			id := "test-slow-" + tc.name
			srv, err := nbd.NewServer(nbd.Export{Name: id, Backend: b})
			if err != nil {
				t.Fatal(err)
			}
			tc.opts.BackendID = id
			att := connectOpts(t, k, srv, tc.opts)
			t.Cleanup(b.let) // before the disconnect, which waits for it
			if tc.ioTimeout > 0 {
				setIOTimeout(t, att, tc.ioTimeout)
			}
			deads := watchLinkDeads(t, att)
			d := openDirect(t, att.Path())
			mark := kernelLogMark()
			start := time.Now()
			done := make(chan error, 1)
			go func() { done <- d.write(pattern(3, 4096), off) }()
			<-b.held
			select {
			case err := <-done:
				t.Fatalf("the write completed (%v) while the server still held it", err)
			case <-time.After(tc.hold):
			}
			b.let()
			err = <-done
			took := time.Since(start)
			got, rerr := d.read(4096, off)
			t.Logf("%s: held %v; the write returned %v after %v; LINK_DEAD %d; the backend ran it %d times\nkernel log:\n%s",
				tc.name, tc.hold, err, took.Round(time.Millisecond), deads.count(), b.runs.Load(), kernelLog(att.Path(), mark))
			if err != nil {
				t.Errorf("the kernel failed a slow write: %v", err)
			}
			if rerr != nil || !bytes.Equal(got, pattern(3, 4096)) {
				t.Errorf("read back after the slow write: %v, data differs: %v", rerr, !bytes.Equal(got, pattern(3, 4096)))
			}
			resent := deads.count() > 0 || b.runs.Load() > 1
			if resent != tc.resends {
				t.Errorf("resent = %v (LINK_DEAD %d, runs %d), want %v: the kernel's behaviour differs from what the package documentation says",
					resent, deads.count(), b.runs.Load(), tc.resends)
			}
		})
	}
}

// testStaleWriteAfterResend: with a configuration under which the kernel
// does resend (two connections, 1 s timeout), a write held in the server
// past the timeout is resent; the filesystem's next write to the block
// must not be overwritten when the first copy finally runs.
func testStaleWriteAfterResend(t *testing.T) {
	const off = 1 << 20
	b := newHoldBackend(t, 16<<20, off)
	const id = "test-stale-write"
	srv, err := nbd.NewServer(nbd.Export{Name: id, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	k := openKernel(t)
	att := connectOpts(t, k, srv, nbd.AttachOptions{BackendID: id, Connections: 2, Timeout: time.Second})
	t.Cleanup(b.let)
	deads := watchLinkDeads(t, att)
	d := openDirect(t, att.Path())
	first, newer := pattern(10, 4096), pattern(11, 4096)
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(att.Path(), os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		if err != nil {
			done <- err
			return
		}
		defer unix.Munmap(buf)
		copy(buf, first)
		_, err = f.WriteAt(buf, off)
		done <- err
	}()
	<-b.held
	select {
	case <-deads.signal: // the kernel gave up on the connection and resent
	case <-time.After(time.Minute):
		t.Fatal("the kernel never timed the held write out")
	}
	// Give the resent copy the chance to complete, as it did before
	// writes were ordered; with ordering it waits for the first copy.
	completed := false
	select {
	case err := <-done:
		completed = true
		if err != nil {
			t.Fatalf("first write: %v", err)
		}
	case <-time.After(10 * time.Second):
	}
	if completed {
		if err := d.write(newer, off); err != nil {
			t.Fatal(err)
		}
	}
	b.let()
	<-b.landed
	if !completed {
		if err := <-done; err != nil {
			t.Fatalf("first write: %v", err)
		}
		if err := d.write(newer, off); err != nil {
			t.Fatal(err)
		}
	}
	got, err := d.read(4096, off)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("resent copy completed before the first copy ran: %v; LINK_DEAD %d; runs %d", completed, deads.count(), b.runs.Load())
	if !bytes.Equal(got, newer) {
		t.Fatalf("the block holds the first write's data: the held copy landed after the newer write")
	}
}

// panicOnce is a raw file whose WriteAt panics once at panicOff.
type panicOnce struct {
	growFile
	panicOff int64
	armed    atomic.Bool
}

func (p *panicOnce) WriteAt(b []byte, off int64) (int, error) {
	if off == p.panicOff && p.armed.CompareAndSwap(true, false) {
		panic("injected panic in WriteAt")
	}
	return p.growFile.WriteAt(b, off)
}

// testPanicIsolation: two devices served by one Server; a panic in one
// export's backend fails that device's I/O with EIO from then on, and
// the other device carries on.
func testPanicIsolation(t *testing.T) {
	dir := t.TempDir()
	files := map[string]*os.File{}
	for _, n := range []string{"bad", "good"} {
		f, err := os.Create(filepath.Join(dir, n+".raw"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(64 << 20); err != nil {
			t.Fatal(err)
		}
		files[n] = f
	}
	bad := &panicOnce{growFile: growFile{files["bad"]}, panicOff: 8 << 20}
	failed := make(chan error, 1)
	srv := nbd.New(nbd.ServerOptions{})
	for _, e := range []nbd.Export{
		{Name: "bad", Backend: bad, OnFailure: func(err error) { failed <- err }},
		{Name: "good", Backend: growFile{files["good"]}},
	} {
		if err := srv.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	k := openKernel(t)
	badAtt := connectOpts(t, k, srv, nbd.AttachOptions{BackendID: "test-panic-bad", Export: "bad"})
	goodAtt := connectOpts(t, k, srv, nbd.AttachOptions{BackendID: "test-panic-good", Export: "good", Connections: 2})
	bd, gd := openDirect(t, badAtt.Path()), openDirect(t, goodAtt.Path())
	mark := kernelLogMark()
	if err := gd.write(pattern(20, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	bad.armed.Store(true)
	if err := bd.write(pattern(21, 4096), 8<<20); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write that panicked in the server: %v, want EIO", err)
	}
	select {
	case err := <-failed:
		if !errors.Is(err, nbd.ErrExportFailed) {
			t.Errorf("OnFailure got %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("OnFailure not called")
	}
	if err := srv.Failed("bad"); err == nil {
		t.Error("Failed(bad) = nil")
	}
	// The failed device: every request is EIO now, reads included.
	if _, err := bd.read(4096, 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("read from the failed device: %v, want EIO", err)
	}
	if err := bd.write(pattern(22, 4096), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("write to the failed device: %v, want EIO", err)
	}
	// The other device, and its data written before the panic.
	got, err := gd.read(1<<20, 0)
	if err != nil || !bytes.Equal(got, pattern(20, 1<<20)) {
		t.Fatalf("good device after the panic: %v, data equal %v", err, bytes.Equal(got, pattern(20, 1<<20)))
	}
	if err := gd.write(pattern(23, 1<<20), 4<<20); err != nil {
		t.Fatal(err)
	}
	if got, err := gd.read(1<<20, 4<<20); err != nil || !bytes.Equal(got, pattern(23, 1<<20)) {
		t.Fatalf("good device write after the panic: %v", err)
	}
	if err := srv.Failed("good"); err != nil {
		t.Errorf("Failed(good) = %v", err)
	}
	t.Logf("kernel log:\n%s", kernelLog(badAtt.Path(), mark))
}
