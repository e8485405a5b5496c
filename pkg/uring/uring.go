// Package uring runs positioned file reads and writes through a Linux
// io_uring, so that a goroutine waiting for disk I/O parks like one waiting
// for a socket instead of holding an OS thread, and the Go scheduler's P,
// in a blocking pread or pwrite. With O_DIRECT and many requests in flight
// that matters: every blocking syscall that outlives a few microseconds
// makes the runtime hand its P to another thread and take one back later,
// and on a small machine those hand-offs, not the I/O, set the pace.
//
// A Ring has a fixed number of slots; a call takes one, fills a submission
// entry and enters the kernel to submit it, then parks until the ring's
// eventfd, read through the runtime's netpoller, reports its completion.
// Holding at most as many requests in flight as the completion queue has
// room for means completions are never dropped. Submission holds a mutex;
// completion is one goroutine per ring. A kernel without io_uring, or a
// seccomp policy that refuses it, makes New fail, and callers fall back to
// plain pread/pwrite.
//
// Raw, which Ring is built on, is the ring itself for a caller that drives
// it alone: push entries, enter, reap. The ublk server (pkg/ublk) runs its
// queues and control commands (IORING_OP_URING_CMD, 128-byte entries) on it.
//
// Caution: the kernel completes a request as task work on the thread that
// submitted it. A Go program cannot choose that thread, so a thread that
// later blocks in a syscall which itself waits for this ring's I/O (FITRIM
// or FIFREEZE on a filesystem the same process serves) never runs the task
// work, and both wait for ever. Image storage therefore does not use a Ring
// yet (the driver's Trim test deadlocked); a server whose ring is owned by
// one dedicated, locked thread (the ublk server) avoids it.
package uring

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kernel ABI (include/uapi/linux/io_uring.h), identical on every
// architecture Go supports on Linux.
const (
	opRead  = 22 // IORING_OP_READ, Linux 5.6
	opWrite = 23 // IORING_OP_WRITE, Linux 5.6

	featSingleMmap = 1 << 0 // IORING_FEAT_SINGLE_MMAP
	featNoDrop     = 1 << 1 // IORING_FEAT_NODROP

	offSQRing = 0          // IORING_OFF_SQ_RING
	offSQEs   = 0x10000000 // IORING_OFF_SQES

	registerEventfd = 4 // IORING_REGISTER_EVENTFD
	registerProbe   = 8 // IORING_REGISTER_PROBE

	probeOpSupported = 1 // IO_URING_OP_SUPPORTED

	sqeSize = 64
	cqeSize = 16
)

// Ring is one io_uring with its completion goroutine. Its methods are safe
// for concurrent use.
type Ring struct {
	raw   *Raw
	event *os.File // eventfd, nonblocking, so reads park in the netpoller

	mu     sync.Mutex // submission
	free   chan uint32
	slots  []slot
	closed chan struct{}
	reaped chan struct{}
	once   sync.Once
	err    error
}

// slot is one request in flight. buf pins the caller's buffer: assigning
// it to a heap object makes the compiler put it on the heap, where it does
// not move while the kernel holds its address.
type slot struct {
	buf []byte
	res chan int32
}

// New sets up a ring with room for entries requests in flight (a power of
// two up to 4096). It fails when the kernel lacks io_uring or its READ and
// WRITE operations (Linux before 5.6), or when a seccomp policy refuses the
// system calls: the caller then uses pread and pwrite.
func New(entries uint32) (*Ring, error) {
	raw, err := NewRaw(entries, 0)
	if err != nil {
		return nil, err
	}
	r := &Ring{raw: raw, closed: make(chan struct{}), reaped: make(chan struct{})}
	if err := r.setup(); err != nil {
		r.release()
		return nil, err
	}
	r.free = make(chan uint32, entries)
	r.slots = make([]slot, entries)
	for i := range r.slots {
		r.slots[i].res = make(chan int32, 1)
		r.free <- uint32(i)
	}
	go r.reap()
	return r, nil
}

// setup checks the kernel's features and operations and registers the
// eventfd.
func (r *Ring) setup() error {
	if f := r.raw.features; f&featNoDrop == 0 {
		return fmt.Errorf("io_uring: kernel lacks no-drop rings (features %#x; Linux 5.5 or later has them)", f)
	}
	if err := r.probe(opRead, opWrite); err != nil {
		return err
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("io_uring: eventfd: %w", err)
	}
	r.event = os.NewFile(uintptr(efd), "io_uring-eventfd")
	fd32 := int32(efd)
	if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.raw.Fd()), registerEventfd, uintptr(unsafe.Pointer(&fd32)), 1, 0, 0); errno != 0 {
		return fmt.Errorf("io_uring: register eventfd: %w", errno)
	}
	return nil
}

// probe checks that the kernel supports the operations.
func (r *Ring) probe(ops ...uint8) error {
	const nops = 64
	// struct io_uring_probe: last_op, ops_len, resv, resv2[3], then
	// struct io_uring_probe_op {op, resv, flags u16, resv2 u32} each.
	buf := make([]byte, 16+nops*8)
	if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.raw.Fd()), registerProbe, uintptr(unsafe.Pointer(&buf[0])), nops, 0, 0); errno != 0 {
		return fmt.Errorf("io_uring: probe operations: %w", errno)
	}
	return checkProbe(buf, ops...)
}

// checkProbe reads an io_uring_probe reply.
func checkProbe(buf []byte, ops ...uint8) error {
	if len(buf) < 16 {
		return errors.New("io_uring: short probe reply")
	}
	opsLen := int(buf[1])
	for _, op := range ops {
		at := 16 + int(op)*8
		if int(op) >= opsLen || at+8 > len(buf) || buf[at] != op || buf[at+2]&probeOpSupported == 0 {
			return fmt.Errorf("io_uring: kernel lacks operation %d (READ and WRITE need Linux 5.6)", op)
		}
	}
	return nil
}

// ReadAt reads len(p) bytes from fd at off, like pread in a loop: it
// returns io.EOF when the file ends first.
func (r *Ring) ReadAt(fd int, p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := r.do(opRead, fd, p[done:], off+int64(done))
		if err != nil {
			return done, err
		}
		if n == 0 {
			return done, io.EOF
		}
		done += n
	}
	return done, nil
}

// WriteAt writes len(p) bytes to fd at off, like pwrite in a loop.
func (r *Ring) WriteAt(fd int, p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := r.do(opWrite, fd, p[done:], off+int64(done))
		if err != nil {
			return done, err
		}
		if n == 0 {
			return done, io.ErrShortWrite
		}
		done += n
	}
	return done, nil
}

// Refused reports whether err from New means that io_uring is not there to
// use (a kernel without it, a seccomp policy or the kernel.io_uring_disabled
// sysctl refusing it) rather than that something went wrong.
func Refused(err error) bool {
	return errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)
}

// ErrClosed is returned by calls on a closed ring.
var ErrClosed = errors.New("io_uring: ring closed")

// do runs one operation and waits for it. At most 1 GiB goes in one
// request, as the kernel caps a read or write anyway.
func (r *Ring) do(op uint8, fd int, p []byte, off int64) (int, error) {
	if len(p) > 1<<30 {
		p = p[:1<<30]
	}
	var id uint32
	select {
	case id = <-r.free:
	case <-r.closed:
		return 0, ErrClosed
	}
	s := &r.slots[id]
	s.buf = p
	defer func() {
		s.buf = nil
		r.free <- id
	}()
	for {
		if err := r.submit(op, fd, p, off, id); err != nil {
			return 0, err
		}
		res := <-s.res
		runtime.KeepAlive(p)
		switch {
		case res >= 0:
			return int(res), nil
		case syscall.Errno(-res) == unix.EINTR || syscall.Errno(-res) == unix.EAGAIN:
			continue // as pread and pwrite would be retried
		default:
			return 0, syscall.Errno(-res)
		}
	}
}

// submit queues one entry and enters the kernel to start it.
func (r *Ring) submit(op uint8, fd int, p []byte, off int64, id uint32) error {
	var addr uintptr
	if len(p) > 0 {
		addr = uintptr(unsafe.Pointer(&p[0]))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-r.closed:
		return ErrClosed
	default:
	}
	// Entries are consumed by the Enter below, under the same lock, so
	// the queue never holds another unsubmitted one.
	if err := r.raw.Push(func(sqe []byte) {
		PrepRW(sqe, op, fd, uint64(off), addr, uint32(len(p)), uint64(id))
	}); err != nil {
		return err
	}
	if err := r.raw.Enter(0); err != nil {
		r.raw.Unpush()
		return err
	}
	return nil
}

// reap delivers completions until the ring is closed. The eventfd is read
// before the queue is drained, so a completion posted during a drain
// leaves the eventfd readable for the next round.
func (r *Ring) reap() {
	defer close(r.reaped)
	var b [8]byte
	for {
		if _, err := r.event.Read(b[:]); err != nil {
			return
		}
		r.raw.Reap(func(userData uint64, res int32) {
			if userData < uint64(len(r.slots)) {
				r.slots[userData].res <- res
			}
		})
	}
}

// Close waits for the requests in flight, then releases the ring. Later
// calls return ErrClosed.
func (r *Ring) Close() error {
	r.once.Do(func() {
		r.mu.Lock()
		close(r.closed)
		r.mu.Unlock()
		for range r.slots {
			<-r.free
		}
		r.err = r.release()
	})
	return r.err
}

// release undoes New.
func (r *Ring) release() error {
	var errs []error
	if r.event != nil {
		errs = append(errs, r.event.Close())
		if r.slots != nil { // the completion goroutine runs
			<-r.reaped
		}
	}
	errs = append(errs, r.raw.Close())
	return errors.Join(errs...)
}
