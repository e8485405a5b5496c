package powerloss

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
	"golang.org/x/sys/unix"
)

// countingDisk counts the flushes that reach the backend: proof that the
// client's fsync of the nbd device became an NBD flush.
type countingDisk struct {
	ploop.Disk
	flushes atomic.Int64
}

func (c *countingDisk) Flush() error {
	c.flushes.Add(1)
	return c.Disk.Flush()
}

// served is a backend served by our NBD server to a kernel nbd device,
// opened with O_DIRECT so that every write reaches the server at once and
// fsync sends an NBD flush.
type served struct {
	att  *nbd.Attachment // over nbd
	ublk *ublk.Device    // over ublk
	disk *countingDisk
	dev  *os.File
}

// transportEnv makes serve attach through ublk (TestPowerLossUblk).
const transportEnv = "PLOOP_CSI_TEST_TRANSPORT"

// serve attaches d to a kernel nbd device through pkg/nbd, or to a ublk
// device through pkg/ublk when the case runs over ublk.
func serve(t *testing.T, d ploop.Disk, id string) *served {
	t.Helper()
	if os.Getenv(transportEnv) == "ublk" {
		return serveUblk(t, d)
	}
	cd := &countingDisk{Disk: d}
	srv, err := nbd.NewServer(nbd.Export{Name: id, Backend: cd})
	if err != nil {
		t.Fatal(err)
	}
	k, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	att, err := k.Connect(ctx, srv, nbd.AttachOptions{
		BackendID: id, Index: nbd.AnyDevice, Connections: 2,
		// Emulation is slow: a resent request would be a test artefact.
		Timeout: 10 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	s := &served{att: att, disk: cd}
	t.Cleanup(func() {
		if s.dev != nil {
			s.dev.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		att.Disconnect(ctx) // idempotent; the scenario disconnects first
	})
	if s.dev, err = os.OpenFile(att.Path(), os.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	return s
}

// serveUblk serves d through a ublk device with 4096-byte blocks, as the
// driver's ublk attach path does.
func serveUblk(t *testing.T, d ploop.Disk) *served {
	t.Helper()
	cd := &countingDisk{Disk: d}
	ctrl, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctrl.Close() })
	u, err := ublk.Create(ctrl, cd, ublk.Options{BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	s := &served{ublk: u, disk: cd}
	t.Cleanup(func() {
		if s.dev != nil {
			s.dev.Close()
		}
		u.Close() // idempotent; the scenario disconnects first
	})
	if s.dev, err = os.OpenFile(u.Path(), os.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	return s
}

// disconnect detaches the device; the backend may then be closed.
func (s *served) disconnect(t *testing.T) {
	t.Helper()
	s.dev.Close()
	s.dev = nil
	if s.ublk != nil {
		if err := s.ublk.Close(); err != nil {
			t.Fatal(err)
		}
		if err := s.ublk.Err(); err != nil {
			t.Fatalf("the ublk device served with an error: %v", err)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.att.Disconnect(ctx); err != nil {
		t.Fatal(err)
	}
}

// alignedBuffer is memory O_DIRECT accepts (page aligned).
func alignedBuffer(n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		panic(fmt.Sprintf("mmap %d bytes: %v", n, err))
	}
	return b
}

func blkDiscard(f *os.File, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); errno != 0 {
		return fmt.Errorf("BLKDISCARD %d+%d: %w", off, n, errno)
	}
	return nil
}

// workload writes to the nbd device from several goroutines and flushes
// it after every perFlush completed writes, inserting a mark into the log
// after each flush completes. Writer w writes only the clusters
// clusters(w) returns, so a block never has two writes in flight.
type workload struct {
	m        *model
	r        *rig
	dev      *os.File
	cs       int64
	writers  int
	perFlush int64
	clusters func(w int) []int64
	// zeroOnly clusters only ever get zeros (compaction candidates).
	zeroOnly func(c int64) bool
	discard  bool

	writes    atomic.Int64
	kick      chan struct{}
	flushMu   sync.Mutex
	flushes   atomic.Int64
	flushKick chan struct{}
	stats     struct {
		sync.Mutex
		byKind map[string]int
	}
}

func newWorkload(m *model, r *rig, dev *os.File, cs int64) *workload {
	wl := &workload{m: m, r: r, dev: dev, cs: cs, writers: 4, perFlush: 24,
		kick: make(chan struct{}, 1), flushKick: make(chan struct{}, 1),
		zeroOnly: func(int64) bool { return false }}
	wl.stats.byKind = map[string]int{}
	return wl
}

func (wl *workload) blocksOf(c int64) []int64 {
	per := wl.cs / blockSize
	bs := make([]int64, per)
	for k := range bs {
		bs[k] = c*per + int64(k)
	}
	return bs
}

// put issues one write (or discard) of kind to blocks (consecutive) and
// records it in the model around the I/O.
func (wl *workload) put(buf []byte, blocks []int64, kind writeKind, what string) error {
	tags := wl.m.begin(blocks, kind)
	off := blocks[0] * blockSize
	p := buf[:len(blocks)*blockSize]
	var err error
	switch kind {
	case kindDiscard:
		err = blkDiscard(wl.dev, off, int64(len(p)))
	case kindZero:
		clear(p)
		_, err = wl.dev.WriteAt(p, off)
	default:
		for k, b := range blocks {
			fillBlock(p[k*blockSize:], b, tags[k])
		}
		_, err = wl.dev.WriteAt(p, off)
	}
	if err != nil {
		// The model cannot tell whether it landed: stop the run.
		return fmt.Errorf("%s at byte %d (%d blocks): %w", what, off, len(blocks), err)
	}
	wl.m.complete(blocks)
	wl.stats.Lock()
	wl.stats.byKind[what]++
	wl.stats.Unlock()
	wl.writes.Add(1)
	select {
	case wl.kick <- struct{}{}:
	default:
	}
	return nil
}

// writer issues random writes to its clusters until ctx ends: mostly 4 KiB
// writes inside a cluster (a copy-up where only a lower delta has it),
// some whole clusters, zeros, and discards of whole clusters.
func (wl *workload) writer(ctx context.Context, id int, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, uint64(id)))
	buf := alignedBuffer(int(wl.cs))
	defer unix.Munmap(buf)
	for ctx.Err() == nil {
		cl := wl.clusters(id)
		c := cl[rng.IntN(len(cl))]
		all := wl.blocksOf(c)
		k := rng.IntN(len(all))
		one := all[k : k+1]
		zone := wl.zeroOnly(c)
		var err error
		switch op := rng.IntN(100); {
		case op < 5 && wl.discard:
			err = wl.put(buf, all, kindDiscard, "discard cluster")
		case op < 15 && zone, op < 8:
			err = wl.put(buf, all, kindZero, "zero cluster")
		case op < 20 && !zone:
			err = wl.put(buf, all, kindData, "write cluster")
		case zone, op < 30:
			err = wl.put(buf, one, kindZero, "zero 4k")
		default:
			err = wl.put(buf, one, kindData, "write 4k")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// flush fsyncs the device (an NBD flush) and marks the log flush-N once it
// completed; the model learns which writes it made durable.
func (wl *workload) flush() error {
	wl.flushMu.Lock()
	defer wl.flushMu.Unlock()
	durable := wl.m.completed()
	if err := wl.dev.Sync(); err != nil {
		return fmt.Errorf("flush the nbd device: %w", err)
	}
	n := wl.flushes.Load() + 1
	if err := wl.m.mark(wl.r.mark, fmt.Sprintf("flush-%d", n), durable); err != nil {
		return err
	}
	wl.flushes.Store(n)
	select {
	case wl.flushKick <- struct{}{}:
	default:
	}
	return nil
}

func (wl *workload) flusher(ctx context.Context) error {
	last := wl.writes.Load()
	for {
		for wl.writes.Load()-last < wl.perFlush {
			select {
			case <-wl.kick:
			case <-ctx.Done():
				return nil
			}
		}
		last = wl.writes.Load()
		if err := wl.flush(); err != nil {
			return err
		}
	}
}

// stallDump is how long waitFlushes sees no flush complete before it
// logs where every goroutine and thread of the process waits (once): a
// request the server never answers stalls the kernel for its whole
// timeout, and the dump says which stage holds it.
const stallDump = time.Minute

// waitFlushes returns once n more flushes completed.
func (wl *workload) waitFlushes(ctx context.Context, n int64) error {
	target := wl.flushes.Load() + n
	stall := time.NewTimer(stallDump)
	defer stall.Stop()
	last, dumped := wl.flushes.Load(), false
	for wl.flushes.Load() < target {
		select {
		case <-wl.flushKick:
		case <-stall.C:
			if now := wl.flushes.Load(); now == last && !dumped {
				dumped = true
				wl.r.t.Logf("no flush completed for %v (%s); where the process waits:\n%s", stallDump, wl.summary(), stacks())
			} else {
				last = now
			}
			stall.Reset(stallDump)
		case <-ctx.Done():
			return fmt.Errorf("waiting for %d flushes (done %d): %w", n, wl.flushes.Load(), context.Cause(ctx))
		}
	}
	return nil
}

// stacks is every goroutine's stack and every thread's kernel stack.
func stacks() string {
	buf := make([]byte, 16<<20)
	var b strings.Builder
	b.Write(buf[:runtime.Stack(buf, true)])
	tasks, _ := filepath.Glob("/proc/self/task/*/stack")
	for _, p := range tasks {
		if k, err := os.ReadFile(p); err == nil && len(k) > 0 {
			fmt.Fprintf(&b, "\nkernel stack of %s:\n%s", filepath.Base(filepath.Dir(p)), k)
		}
	}
	return b.String()
}

// running is a running workload: writers and the flusher.
type running struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	err    error
	// failed ends when a writer or the flusher failed.
	failed context.Context
	fail   context.CancelCauseFunc
}

func (wl *workload) start(seed uint64) *running {
	ctx, cancel := context.WithCancel(context.Background())
	failed, fail := context.WithCancelCause(context.Background())
	rn := &running{cancel: cancel, failed: failed, fail: fail}
	goRun := func(f func() error) {
		rn.wg.Add(1)
		go func() {
			defer rn.wg.Done()
			if err := f(); err != nil {
				rn.mu.Lock()
				if rn.err == nil {
					rn.err = err
				}
				rn.mu.Unlock()
				fail(err)
				cancel()
			}
		}()
	}
	for w := range wl.writers {
		goRun(func() error { return wl.writer(ctx, w, seed) })
	}
	goRun(func() error { return wl.flusher(ctx) })
	return rn
}

// stop ends the writers and the flusher and returns the first error.
func (rn *running) stop() error {
	rn.cancel()
	rn.wg.Wait()
	rn.fail(context.Canceled)
	rn.mu.Lock()
	defer rn.mu.Unlock()
	return rn.err
}

// ctx is a context for the controller that ends with the run's failure
// or after d.
func (rn *running) ctx(d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeoutCause(rn.failed, d, fmt.Errorf("the workload made no progress for %v", d))
	return ctx, cancel
}

func (wl *workload) summary() string {
	wl.stats.Lock()
	defer wl.stats.Unlock()
	return fmt.Sprintf("%d writes (%v), %d flushes", wl.writes.Load(), wl.stats.byKind, wl.flushes.Load())
}
