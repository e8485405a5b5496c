package uring

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	opURingCmd = 46 // IORING_OP_URING_CMD, Linux 5.19

	// SetupSQE128 makes submission entries 128 bytes, room for the
	// 80-byte commands of IORING_OP_URING_CMD (ublk's control commands).
	SetupSQE128 = 1 << 10
	// SetupSingleIssuer with SetupDeferTaskrun (Linux 6.1) let the
	// kernel run a ring's completion work only when its one submitting
	// thread enters to wait, instead of interrupting that thread for each
	// completion.
	SetupSingleIssuer = 1 << 12
	SetupDeferTaskrun = 1 << 13

	enterGetEvents = 1 << 0 // IORING_ENTER_GETEVENTS

	paramsSize = 120 // struct io_uring_params
)

var le = binary.LittleEndian

// Raw is an io_uring driven by its one owner: it pushes submission
// entries, enters the kernel and reaps completions itself. Its entries map
// 1:1 onto SQ slots. It is not safe for concurrent use, except that
// pushing and reaping touch different queues and may run on two
// goroutines (as Ring does); ublk also wants a queue's commands issued by
// one thread, so its rings each belong to a goroutine locked to a thread.
type Raw struct {
	fd       int
	mem      []byte // SQ and CQ rings (one mapping: IORING_FEAT_SINGLE_MMAP)
	sqes     []byte
	sqeBytes int

	sqHead, sqTail, cqHead, cqTail *uint32
	sqMask, sqEntries, cqMask      uint32
	cqes                           uint32 // offset of the CQE array in mem

	tail     uint32 // next SQE to fill (published to *sqTail on push)
	pending  uint32 // pushed but not yet taken by the kernel
	features uint32
}

// NewRaw sets up a ring of entries submission slots (a power of two up to
// 4096) with the IORING_SETUP_* flags.
func NewRaw(entries uint32, flags uint32) (*Raw, error) {
	if entries == 0 || entries > 4096 || entries&(entries-1) != 0 {
		return nil, fmt.Errorf("io_uring: %d entries: want a power of two up to 4096", entries)
	}
	var p [paramsSize]byte
	le.PutUint32(p[8:], flags)
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p[0])), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Raw{fd: int(fd), sqeBytes: sqeSize}
	if flags&SetupSQE128 != 0 {
		r.sqeBytes = 2 * sqeSize
	}
	ok := false
	defer func() {
		if !ok {
			r.Close()
		}
	}()
	sqEntries, cqEntries := le.Uint32(p[0:]), le.Uint32(p[4:])
	r.features = le.Uint32(p[20:])
	if r.features&featSingleMmap == 0 {
		return nil, fmt.Errorf("io_uring: kernel lacks single-mmap rings (features %#x; Linux 5.4 or later has them)", r.features)
	}
	sqArray := le.Uint32(p[64:])
	r.cqes = le.Uint32(p[100:])
	size := max(int(sqArray)+int(sqEntries)*4, int(r.cqes)+int(cqEntries)*cqeSize)
	mem, err := unix.Mmap(r.fd, offSQRing, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("io_uring: map rings: %w", err)
	}
	r.mem = mem
	sqes, err := unix.Mmap(r.fd, offSQEs, int(sqEntries)*r.sqeBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("io_uring: map SQEs: %w", err)
	}
	r.sqes = sqes
	r.sqHead = r.word(le.Uint32(p[40:]))
	r.sqTail = r.word(le.Uint32(p[44:]))
	r.sqMask = *r.word(le.Uint32(p[48:]))
	r.sqEntries = sqEntries
	r.cqHead = r.word(le.Uint32(p[80:]))
	r.cqTail = r.word(le.Uint32(p[84:]))
	r.cqMask = *r.word(le.Uint32(p[88:]))
	for i := range sqEntries { // SQ slot i always names SQE i
		*r.word(sqArray + 4*i) = i
	}
	r.tail = atomic.LoadUint32(r.sqTail)
	ok = true
	return r, nil
}

func (r *Raw) word(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&r.mem[off])) }

// Fd is the ring's file descriptor.
func (r *Raw) Fd() int { return r.fd }

// Pending is the number of entries pushed but not yet submitted.
func (r *Raw) Pending() uint32 { return r.pending }

// Push fills the next SQE with fill (given it zeroed) and publishes it.
// It fails when the SQ is full; callers size rings so that it never is.
func (r *Raw) Push(fill func(sqe []byte)) error {
	if r.tail-atomic.LoadUint32(r.sqHead) >= r.sqEntries {
		return errors.New("io_uring: submission queue full")
	}
	i := int(r.tail&r.sqMask) * r.sqeBytes
	sqe := r.sqes[i : i+r.sqeBytes]
	clear(sqe)
	fill(sqe)
	r.tail++
	atomic.StoreUint32(r.sqTail, r.tail)
	r.pending++
	return nil
}

// Unpush takes back the entries pushed since the last successful Enter,
// which the kernel has not seen.
func (r *Raw) Unpush() {
	r.tail -= r.pending
	r.pending = 0
	atomic.StoreUint32(r.sqTail, r.tail)
}

// Enter submits what was pushed and, with wait > 0, blocks until that
// many completions are there.
func (r *Raw) Enter(wait uint32) error {
	var flags uintptr
	if wait > 0 {
		flags = enterGetEvents
	}
	for r.pending > 0 || (wait > 0 && r.ready() < wait) {
		// The runtime's preemption signals interrupt the wait: a return
		// is not a completion, so the loop checks the CQ itself.
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(r.pending), uintptr(wait), flags, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return fmt.Errorf("io_uring_enter: %w", errno)
		}
		if n == 0 && r.pending > 0 && wait == 0 {
			return fmt.Errorf("io_uring_enter: no entry taken: %w", unix.EAGAIN)
		}
		r.pending -= uint32(n)
	}
	return nil
}

// ready is the number of completions waiting to be reaped.
func (r *Raw) ready() uint32 {
	return atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead)
}

// Reap calls f for each completion there is, in order, and frees them.
func (r *Raw) Reap(f func(userData uint64, res int32)) {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	for ; head != tail; head++ {
		off := r.cqes + (head&r.cqMask)*cqeSize
		cqe := r.mem[off : off+cqeSize]
		f(le.Uint64(cqe[0:]), int32(le.Uint32(cqe[8:])))
	}
	atomic.StoreUint32(r.cqHead, head)
}

// Close releases the ring; the kernel cancels what is still in flight.
func (r *Raw) Close() error {
	var errs []error
	if r.sqes != nil {
		errs = append(errs, unix.Munmap(r.sqes))
		r.sqes = nil
	}
	if r.mem != nil {
		errs = append(errs, unix.Munmap(r.mem))
		r.mem = nil
	}
	if r.fd >= 0 {
		errs = append(errs, unix.Close(r.fd))
		r.fd = -1
	}
	return errors.Join(errs...)
}

// PrepURingCmd fills an IORING_OP_URING_CMD SQE: cmdOp at its offset 8 and
// the command's payload in the area from offset 48 (16 bytes in a 64-byte
// SQE, 80 in a 128-byte one).
func PrepURingCmd(sqe []byte, fd int, cmdOp uint32, userData uint64, payload []byte) {
	sqe[0] = opURingCmd
	le.PutUint32(sqe[4:], uint32(fd))
	le.PutUint32(sqe[8:], cmdOp)
	le.PutUint64(sqe[32:], userData)
	copy(sqe[48:], payload)
}

// PrepRW fills a READ or WRITE SQE of n bytes at addr, file offset off.
func PrepRW(sqe []byte, op uint8, fd int, off uint64, addr uintptr, n uint32, userData uint64) {
	sqe[0] = op
	le.PutUint32(sqe[4:], uint32(fd))
	le.PutUint64(sqe[8:], off)
	le.PutUint64(sqe[16:], uint64(addr))
	le.PutUint32(sqe[24:], n)
	le.PutUint64(sqe[32:], userData)
}
