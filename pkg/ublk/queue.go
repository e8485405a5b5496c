package ublk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/uring"
)

// userData of a queue's SQEs: the tag in the low bits, what it is above.
const (
	kindIO    = 0
	kindEvent = 1 << 32
)

// queue serves one hardware queue of a device: a goroutine locked to its
// thread (ublk accepts a queue's commands only from the thread that
// fetched first) that owns the queue's ring, and a goroutine per request
// doing the backend's I/O. Finished requests go back to the ring thread
// through done and an eventfd the ring reads, so the thread sleeps in one
// place: io_uring_enter.
type queue struct {
	dev   *Device
	id    uint16
	depth int
	char  *os.File
	descs []byte // the kernel's request descriptors, shared read-only
	bufs  []byte // depth buffers of maxIO bytes, anonymous memory
	event int    // eventfd
	evbuf []byte // the eventfd read's target, anonymous memory

	mu   sync.Mutex
	done []completion

	stopping atomic.Bool
	serving  sync.WaitGroup // requests being served; they write event last
}

type completion struct {
	tag uint16
	res int32
}

func newQueue(d *Device, id uint16) (*queue, error) {
	q := &queue{dev: d, id: id, depth: int(d.info.Depth), char: d.char, event: -1}
	page := os.Getpagesize()
	area := roundUp(maxQueueDepth*ioDescSize, page)
	var err error
	q.descs, err = unix.Mmap(int(q.char.Fd()), int64(id)*int64(area), roundUp(q.depth*ioDescSize, page), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("map the descriptors of queue %d: %w", id, err)
	}
	if q.bufs, err = unix.Mmap(-1, 0, q.depth*d.maxIO, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		q.release()
		return nil, fmt.Errorf("allocate buffers of queue %d: %w", id, err)
	}
	if q.evbuf, err = unix.Mmap(-1, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		q.release()
		return nil, fmt.Errorf("allocate queue %d: %w", id, err)
	}
	if q.event, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		q.release()
		return nil, fmt.Errorf("eventfd for queue %d: %w", id, err)
	}
	return q, nil
}

func roundUp(n, to int) int { return (n + to - 1) / to * to }

func (q *queue) buf(tag uint16) []byte {
	return q.bufs[int(tag)*q.dev.maxIO : (int(tag)+1)*q.dev.maxIO]
}

// run serves the queue until stop; fetched is told once every tag has
// been fetched (or the queue failed to start).
func (q *queue) run(fetched chan<- error) error {
	runtime.LockOSThread()
	// Never unlocked: the thread is the queue's server in the kernel's
	// eyes, and ends with the goroutine.
	r, err := uring.NewRaw(uint32(nextPow2(q.depth+1)), 0)
	if err != nil {
		fetched <- err
		return err
	}
	defer r.Close()
	for tag := range q.depth {
		if err := q.pushIOCmd(r, ioFetchReq, uint16(tag), 0); err != nil {
			fetched <- err
			return err
		}
	}
	arm := func() error {
		return r.Push(func(sqe []byte) { uring.PrepRW(sqe, opReadFile, q.event, 0, addrOf(q.evbuf), 8, kindEvent) })
	}
	if err := arm(); err != nil {
		fetched <- err
		return err
	}
	if err := r.Enter(0); err != nil {
		fetched <- fmt.Errorf("queue %d: fetch: %w", q.id, err)
		return err
	}
	fetched <- nil

	aborted := 0
	var fail error
	for {
		if err := r.Enter(1); err != nil {
			return fmt.Errorf("queue %d: %w", q.id, err)
		}
		var commits []completion
		r.Reap(func(ud uint64, res int32) {
			tag := uint16(ud)
			switch {
			case ud&kindEvent != 0:
				q.mu.Lock()
				commits = append(commits, q.done...)
				q.done = q.done[:0]
				q.mu.Unlock()
				if !q.stopping.Load() {
					if err := arm(); err != nil && fail == nil {
						fail = err
					}
				}
			case res == ioResOK && q.dev.inline:
				commits = append(commits, completion{tag, q.do(tag)})
			case res == ioResOK:
				q.serving.Add(1)
				go q.serve(tag)
			case res == ioResAbort:
				aborted++
			default:
				aborted++
				if fail == nil {
					fail = fmt.Errorf("queue %d tag %d: %w", q.id, tag, unix.Errno(-res))
				}
			}
		})
		for _, c := range commits {
			if err := q.pushIOCmd(r, ioCommitAndFetch, c.tag, c.res); err != nil && fail == nil {
				fail = err
			}
		}
		if fail != nil || aborted == q.depth || q.stopping.Load() {
			if r.Pending() > 0 {
				r.Enter(0)
			}
			return fail
		}
	}
}

// pushIOCmd queues a FETCH (or COMMIT_AND_FETCH with res) of tag, the
// command written straight into the SQE: this runs once per request.
func (q *queue) pushIOCmd(r *uring.Raw, op uint32, tag uint16, res int32) error {
	return r.Push(func(sqe []byte) {
		uring.PrepURingCmd(sqe, int(q.char.Fd()), iowr(op, ioCmdSize), kindIO|uint64(tag), nil)
		putIOCmd(sqe[48:], q.id, tag, res, uint64(addrOf(q.buf(tag))))
	})
}

// serve carries out one request and queues its completion.
func (q *queue) serve(tag uint16) {
	defer q.serving.Done()
	res := q.do(tag)
	q.mu.Lock()
	q.done = append(q.done, completion{tag, res})
	q.mu.Unlock()
	var one [8]byte
	le.PutUint64(one[:], 1)
	unix.Write(q.event, one[:])
}

func (q *queue) do(tag uint16) (res int32) {
	defer func() {
		// A backend's panic fails this device, not the process.
		if p := recover(); p != nil {
			q.dev.failed.Store(true)
			q.dev.fail(fmt.Errorf("panic serving a request: %v", p))
			res = -int32(syscall.EIO)
		}
	}()
	if q.dev.failed.Load() {
		return -int32(syscall.EIO)
	}
	d, err := decodeIODesc(q.descs[int(tag)*ioDescSize:], q.dev.sectors, q.dev.maxIO)
	if err != nil {
		q.dev.fail(err)
		return -int32(syscall.EIO)
	}
	off, n := int64(d.start)<<9, int64(d.sectors)<<9
	b := q.dev.backend
	switch d.op {
	case opRead:
		got, err := b.ReadAt(q.buf(tag)[:n], off)
		if err != nil && !(errors.Is(err, io.EOF) && int64(got) == n) {
			return errno(err)
		}
		return int32(n)
	case opWrite:
		if _, err := b.WriteAt(q.buf(tag)[:n], off); err != nil {
			return errno(err)
		}
		if d.flags&ioFlagFUA != 0 {
			if err := b.Flush(); err != nil {
				return errno(err)
			}
		}
		return int32(n)
	case opFlush:
		return errno(b.Flush())
	case opDiscard:
		return errno(b.Discard(off, n))
	case opWriteZeroes:
		return errno(b.WriteZeroes(off, n, d.flags&ioFlagNoUnmap != 0))
	}
	return -int32(syscall.EOPNOTSUPP)
}

// errno is the negative errno the kernel takes as a request's result.
func errno(err error) int32 {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		return -int32(e)
	}
	return -int32(syscall.EIO)
}

// stop makes run return after its next wake-up.
func (q *queue) stop() {
	q.stopping.Store(true)
	var one [8]byte
	le.PutUint64(one[:], 1)
	unix.Write(q.event, one[:])
}

func (q *queue) release() {
	q.serving.Wait()
	for _, m := range [][]byte{q.descs, q.bufs, q.evbuf} {
		if m != nil {
			unix.Munmap(m)
		}
	}
	q.descs, q.bufs, q.evbuf = nil, nil, nil
	if q.event >= 0 {
		unix.Close(q.event)
		q.event = -1
	}
}

func nextPow2(n int) int {
	p := 1
	for p < n {
		p <<= 1
	}
	return p
}
