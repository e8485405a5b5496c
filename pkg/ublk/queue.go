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
	kindFile  = 2 << 32
)

// FileMapper is a Backend that can say where a request's bytes are in a
// file, so that the queue reads or writes them on its own ring: no hand-off
// to another thread and back per request. ok false sends the request the
// slow way (ReadAt, WriteAt), and so does a file I/O that fails or comes
// up short, so that errors are the backend's to report. On ok, f nil means
// the range reads as zeros; done is called once the I/O has ended, on the
// queue's thread, so neither call may wait for anything a request in
// flight holds.
type FileMapper interface {
	MapRead(p []byte, off int64) (f *os.File, fileOff int64, done func(), ok bool)
	MapWrite(p []byte, off int64) (f *os.File, fileOff int64, done func(), ok bool)
}

// queue serves one hardware queue of a device: a goroutine locked to its
// thread (ublk accepts a queue's commands only from the thread that
// fetched first) that owns the queue's ring, and a goroutine per request
// doing the backend's I/O. Finished requests go back to the ring thread
// through done and an eventfd the ring reads, so the thread sleeps in one
// place: io_uring_enter. Reads and writes a FileMapper places in a file
// skip the goroutine: the ring does them.
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

	mapper FileMapper // nil when the backend is not one
	// files holds, per tag, the file I/O in flight on the ring; owned by
	// the ring thread.
	files         []fileIO
	filesInFlight int

	stopping atomic.Bool
	serving  sync.WaitGroup // requests being served; they write event last
}

type completion struct {
	tag uint16
	res int32
}

type fileIO struct {
	done func()
	n    int32
}

func newQueue(d *Device, id uint16) (*queue, error) {
	q := &queue{dev: d, id: id, depth: int(d.info.Depth), char: d.char, event: -1}
	if m, ok := d.backend.(FileMapper); ok {
		q.mapper = m
		q.files = make([]fileIO, q.depth)
	}
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
	// The thread enters the ring only to wait for completions: let their
	// work wait for it too. Kernels before 6.1 refuse the flags.
	r, err := uring.NewRaw(uint32(nextPow2(q.depth+1)), uring.SetupSingleIssuer|uring.SetupDeferTaskrun)
	if errors.Is(err, unix.EINVAL) {
		r, err = uring.NewRaw(uint32(nextPow2(q.depth+1)), 0)
	}
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
			case ud&kindFile != 0:
				if q.fileDone(tag, res) {
					commits = append(commits, completion{tag, res})
				} else {
					commits = q.slow(tag, commits)
				}
			case res == ioResOK:
				if !q.mapped(r, tag, &commits) {
					commits = q.slow(tag, commits)
				}
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
			q.drainFiles(r)
			return fail
		}
	}
}

// slow serves a request through the backend's calls: on the ring's thread
// when inline (its completion joins commits), else on a goroutine.
func (q *queue) slow(tag uint16, commits []completion) []completion {
	if q.dev.inline {
		return append(commits, completion{tag, q.do(tag)})
	}
	q.serving.Add(1)
	go q.serve(tag)
	return commits
}

// mapped starts a read or write the mapper places in a file on the ring,
// or finishes one that reads zeros (its completion joins commits); false
// when the request must go the slow way.
func (q *queue) mapped(r *uring.Raw, tag uint16, commits *[]completion) (placed bool) {
	if q.mapper == nil || q.dev.failed.Load() {
		return false
	}
	defer q.recoverBackend(&placed)
	d, err := decodeIODesc(q.descs[int(tag)*ioDescSize:], q.dev.sectors, q.dev.maxIO)
	if err != nil {
		return false // do reports it
	}
	if d.op != opRead && d.op != opWrite || d.sectors == 0 {
		return false
	}
	// A read's or write's length is bounded by the buffer (decodeIODesc).
	off, n := int64(d.start)<<9, int(d.sectors)<<9
	buf := q.buf(tag)[:n]
	var (
		f       *os.File
		fileOff int64
		done    func()
		ok      bool
		op      uint8
	)
	switch {
	case d.op == opRead:
		f, fileOff, done, ok = q.mapper.MapRead(buf, off)
		op = opReadFile
	case d.op == opWrite && d.flags&ioFlagFUA == 0:
		f, fileOff, done, ok = q.mapper.MapWrite(buf, off)
		op = opWriteFile
	}
	if !ok {
		return false
	}
	q.dev.placed.Add(1)
	if f == nil {
		if op != opReadFile {
			done()
			return false
		}
		clear(buf)
		done()
		*commits = append(*commits, completion{tag, int32(n)})
		return true
	}
	fd := int(f.Fd())
	if err := r.Push(func(sqe []byte) {
		uring.PrepRW(sqe, op, fd, uint64(fileOff), addrOf(buf), uint32(n), kindFile|uint64(tag))
	}); err != nil {
		done()
		return false
	}
	q.files[tag] = fileIO{done: done, n: int32(n)}
	q.filesInFlight++
	return true
}

// fileDone ends tag's file I/O; false when it did not move every byte.
func (q *queue) fileDone(tag uint16, res int32) (ok bool) {
	fi := q.files[tag]
	q.files[tag] = fileIO{}
	q.filesInFlight--
	defer q.recoverBackend(&ok)
	fi.done()
	return res == fi.n
}

// recoverBackend, deferred around the mapper's calls on the ring's thread,
// turns a panic into a failed device, as do does: the request then takes
// the slow way, which fails it.
func (q *queue) recoverBackend(ok *bool) {
	if p := recover(); p != nil {
		q.dev.failed.Store(true)
		q.dev.fail(fmt.Errorf("panic placing a request: %v", p))
		*ok = false
	}
}

// drainFiles waits for the file I/O in flight and releases what it holds;
// the requests are not committed (the kernel aborts them, or reissues them
// to the next server). Should the ring fail meanwhile, what they hold stays
// held: released early, a write still in flight could land in a file range
// reused meanwhile.
func (q *queue) drainFiles(r *uring.Raw) {
	for q.filesInFlight > 0 {
		if err := r.Enter(1); err != nil {
			return
		}
		r.Reap(func(ud uint64, res int32) {
			if ud&kindFile != 0 {
				q.fileDone(uint16(ud), res)
			}
		})
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
