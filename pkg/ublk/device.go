// Package ublk serves block devices to the kernel through ublk (Linux 6.0
// and later): the kernel's ublk_drv hands each block request to this
// process through io_uring and shared memory, and the process serves it
// from a Backend (a ploop stack, a raw file), as pkg/nbd does over a
// socket, but without a socket round trip per request.
//
// A Device is one /dev/ublkbN. Control commands (add, set parameters,
// start, stop, delete) go through /dev/ublk-control; each hardware queue
// has a thread that owns an io_uring on the device's char device
// (/dev/ublkcN), fetches requests and commits their results. A backend
// that is a FileMapper (a ploop stack, image or raw file) says where a
// read's or write's bytes are in a file, and the queue's ring reads or
// writes them there itself; every other request (a flush, a discard, a
// write that allocates) goes to a goroutine of its own that calls the
// backend. Data moves by copy between the request's pages and a buffer per
// request the queue maps.
package ublk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Backend is what a device serves: pkg/nbd's Backend, of which ublk uses
// all but extents.
type Backend interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every write that has returned durable.
	Flush() error
	Discard(off, length int64) error
	WriteZeroes(off, length int64, noHole bool) error
	ReadOnly() bool
}

// Options shape a device; the zero value is sensible.
type Options struct {
	// Queues is the number of hardware queues, each with a thread of its
	// own: default the CPUs this process may use (the kernel caps it at
	// the CPU count).
	Queues int
	// Depth is the number of requests a queue holds at once: default 64.
	Depth int
	// MaxIOBytes bounds one request: default 512 KiB.
	MaxIOBytes int
	// BlockSize is the logical block size, 512 (default) or 4096.
	BlockSize int
	// Recoverable keeps the device when its server dies: the kernel
	// holds its requests, and hands those that were in flight to the
	// next server again, until a new process takes it over with Recover.
	// Without it the device fails with its server.
	Recoverable bool
	// Inline serves each request on its queue's thread, one after the
	// other, instead of on a goroutine of its own. That saves a hand-off
	// to another thread and back per request: 2.4x the 4 KiB IOPS under
	// emulation, where the backend answered from the page cache. But a
	// queue then waits for each request in turn, so a backend on a slow
	// disk serves one request per queue at a time. The reads and writes
	// a FileMapper places skip the hand-off either way.
	Inline bool
	// Tag is kept by the kernel with the device (ublksrv_flags, which it
	// never reads), so that a restarted server finds its devices with
	// Control.Find: a hash of the volume's identity, say.
	Tag uint64
}

// Device is a served ublk device.
type Device struct {
	ctrl    *Control
	backend Backend
	info    DevInfo
	maxIO   int
	sectors uint64
	char    *os.File
	queues  []*queue
	wg      sync.WaitGroup
	inline  bool
	gone    chan struct{} // closed when every queue has ended

	// failed is set by a backend's panic: from then on every request
	// fails, since the backend's state may be half changed.
	failed atomic.Bool
	// placed counts the requests a FileMapper placed.
	placed atomic.Uint64

	mu     sync.Mutex
	err    error // the first failure of a queue or a request
	closed bool
}

// Placed is the number of requests served so far by the queues' rings in
// a file a FileMapper named, without the backend's ReadAt or WriteAt.
func (d *Device) Placed() uint64 { return d.placed.Load() }

// Create adds a device for backend, starts serving it and returns once
// the kernel has made the block device (Path).
func Create(ctrl *Control, backend Backend, opts Options) (*Device, error) {
	if opts.Queues <= 0 {
		opts.Queues = runtime.GOMAXPROCS(0)
	}
	if opts.Depth <= 0 {
		opts.Depth = 64
	}
	if opts.MaxIOBytes <= 0 {
		opts.MaxIOBytes = 512 << 10
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = 512
	}
	page := os.Getpagesize()
	switch {
	case opts.BlockSize != 512 && opts.BlockSize != 4096:
		return nil, fmt.Errorf("ublk: block size %d: want 512 or 4096", opts.BlockSize)
	case opts.Depth > maxQueueDepth:
		return nil, fmt.Errorf("ublk: queue depth %d: at most %d", opts.Depth, maxQueueDepth)
	case opts.Queues > 64:
		return nil, fmt.Errorf("ublk: %d queues: at most 64", opts.Queues)
	case opts.MaxIOBytes%page != 0 || opts.MaxIOBytes > 1<<25:
		return nil, fmt.Errorf("ublk: max I/O %d bytes: want a multiple of the page size up to 32 MiB", opts.MaxIOBytes)
	}
	size := backend.Size()
	if size <= 0 || size%int64(opts.BlockSize) != 0 {
		return nil, fmt.Errorf("ublk: backend size %d is not a positive multiple of the %d-byte block", size, opts.BlockSize)
	}
	flags := uint64(flagCmdIoctlEncode)
	if opts.Recoverable {
		flags |= FlagUserRecovery | FlagUserRecoveryReissue
	}
	info, err := ctrl.add(DevInfo{
		Queues:     uint16(opts.Queues),
		Depth:      uint16(opts.Depth),
		MaxIOBytes: uint32(opts.MaxIOBytes),
		ID:         ^uint32(0),
		Flags:      flags,
		ServerData: opts.Tag,
	})
	if err != nil {
		return nil, err
	}
	d := newDevice(ctrl, backend, info, uint64(size)>>9, opts)
	ok := false
	defer func() {
		if !ok { // never started: the device is this call's alone
			d.stopServing()
			d.ctrl.Delete(info.ID)
		}
	}()
	shift := uint8(9)
	if opts.BlockSize == 4096 {
		shift = 12
	}
	p := params{
		attrs:         attrVolatileCache | attrFUA,
		logicalShift:  shift,
		physicalShift: 12,
		maxSectors:    uint32(d.maxIO >> 9),
		devSectors:    d.sectors,
	}
	if backend.ReadOnly() {
		p.attrs |= attrReadOnly
	} else {
		p.discardGranularity = 4096
		p.maxDiscardSectors = 1 << 30 >> 9
		p.maxZeroesSectors = 1 << 30 >> 9
	}
	if err := ctrl.setParams(info.ID, p); err != nil {
		return nil, err
	}
	if err := d.serve(); err != nil {
		return nil, err
	}
	if err := ctrl.start(info.ID); err != nil {
		return nil, err
	}
	ok = true
	return d, nil
}

// Recover takes over device id, whose server died, and serves it from
// backend (the same volume, opened again). The kernel has held the
// device's requests since; with reissue, those the dead server had taken
// come again, so a filesystem above sees no error. ctx bounds the wait
// for the kernel to notice the death (the dead process's files must be
// released first). Of opts only Inline applies: the rest is the device's.
func Recover(ctx context.Context, ctrl *Control, id uint32, backend Backend, opts Options) (*Device, error) {
	info, err := ctrl.Info(id)
	if err != nil {
		return nil, err
	}
	if info.Flags&FlagUserRecovery == 0 {
		return nil, fmt.Errorf("ublk recover device %d: it was not created recoverable", id)
	}
	d := newDevice(ctrl, backend, info, uint64(backend.Size())>>9, opts)
	for {
		_, err = ctrl.command(cmdStartUserRecover, ctrlCmd{devID: id, queueID: ^uint16(0)}, nil)
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		// Busy until the dead server's files are gone and the device
		// quiesced.
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("ublk recover device %d: still busy (state %d): %w", id, d.state(), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, fmt.Errorf("ublk recover device %d: start recovery: %w", id, err)
	}
	// On failure the device stays quiesced, holding its requests, for
	// another Recover: it is the volume's, not this call's.
	if err := d.serve(); err != nil {
		d.stopServing()
		return nil, fmt.Errorf("ublk recover device %d: %w", id, err)
	}
	if _, err := ctrl.command(cmdEndUserRecover, ctrlCmd{devID: id, queueID: ^uint16(0), data: uint64(os.Getpid())}, nil); err != nil {
		d.stopServing()
		return nil, fmt.Errorf("ublk recover device %d: end recovery: %w", id, err)
	}
	return d, nil
}

func newDevice(ctrl *Control, backend Backend, info DevInfo, sectors uint64, opts Options) *Device {
	return &Device{ctrl: ctrl, backend: backend, info: info, maxIO: int(info.MaxIOBytes), sectors: sectors, inline: opts.Inline, gone: make(chan struct{})}
}

func (d *Device) state() int {
	info, err := d.ctrl.Info(d.info.ID)
	if err != nil {
		return -1
	}
	return int(info.State)
}

// serve opens the char device and starts the queues; it returns once
// every queue has fetched every tag, which START_DEV and
// END_USER_RECOVERY wait for.
func (d *Device) serve() error {
	var err error
	if d.char, err = openWait(d.CharPath()); err != nil {
		return err
	}
	for i := range int(d.info.Queues) {
		q, err := newQueue(d, uint16(i))
		if err != nil {
			return err
		}
		d.queues = append(d.queues, q)
	}
	fetched := make(chan error, len(d.queues))
	for _, q := range d.queues {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := q.run(fetched); err != nil {
				d.fail(err)
			}
		}()
	}
	go func() {
		d.wg.Wait()
		close(d.gone)
	}()
	for range d.queues {
		if err := <-fetched; err != nil {
			return err
		}
	}
	return nil
}

// openWait opens a device node that the kernel has just created; devtmpfs
// adds it at once, but udev may still be replacing it.
func openWait(path string) (*os.File, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ID is the device's number: /dev/ublkbID.
func (d *Device) ID() uint32 { return d.info.ID }

// Path is the block device.
func (d *Device) Path() string { return fmt.Sprintf("/dev/ublkb%d", d.info.ID) }

// CharPath is the device's char device, which its server holds.
func (d *Device) CharPath() string { return fmt.Sprintf("/dev/ublkc%d", d.info.ID) }

// Info is the device as the kernel set it up.
func (d *Device) Info() DevInfo { return d.info }

// Err is the first failure of a queue or a request, or nil.
func (d *Device) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

func (d *Device) fail(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil {
		d.err = err
	}
}

// Gone is closed once the device's queues have all ended: after Close or
// Release, or when someone else stopped the device (an administrator's
// `ublk del`), whose I/O then fails.
func (d *Device) Gone() <-chan struct{} { return d.gone }

// Release stops serving but leaves the device: a recoverable device is
// quiesced by the kernel, its requests held, until a successor takes it
// over with Recover (a planned restart); any other device fails its I/O
// until it is deleted. Release is idempotent, and a no-op after Close.
func (d *Device) Release() {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	d.closed = true
	d.mu.Unlock()
	d.stopServing()
}

// Close removes the block device, after the kernel has finished the
// requests in flight, and deletes the device. It is idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	// Queues keep serving while the kernel drains the disk.
	err := d.ctrl.Stop(d.info.ID)
	d.stopServing()
	return errors.Join(err, d.ctrl.Delete(d.info.ID))
}

// stopServing ends the queues and lets go of the char device.
func (d *Device) stopServing() {
	for _, q := range d.queues {
		q.stop()
	}
	d.wg.Wait()
	for _, q := range d.queues {
		q.release()
	}
	if d.char != nil {
		d.char.Close()
	}
}
