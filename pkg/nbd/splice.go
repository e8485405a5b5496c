package nbd

import (
	"errors"
	"io"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reads of backends whose data sits in the page cache skip the two copies
// a pread-then-send costs: the file range is spliced into a pipe (page
// references, no copy) while the backend holds its mapping steady, and
// the writer splices the pipe into the socket, where the client's read is
// the only copy. Whatever cannot go this way (O_DIRECT backends, sockets
// without a file descriptor, small requests, requests larger than a pipe,
// a filesystem without splice) takes the copying path, which is always
// correct.

// FileReader is an optional Backend extension for backends that keep
// their data in files read through the page cache.
type FileReader interface {
	// ReadFile calls piece, in order, for the pieces of the range: n bytes
	// of f at fileOff, or n bytes of zeros when f is nil. The mapping must
	// not change until ReadFile returns, and the bytes of a range handed
	// out must not be reused in place for other data afterwards (a reply
	// may still reference the pages). It returns errors.ErrUnsupported
	// when the backend cannot be read this way.
	ReadFile(off, length int64, piece func(f *os.File, fileOff, n int64) error) error
}

const (
	// pipeSize is what each pipe is asked to hold; without the privilege
	// to exceed the user's pipe allowance the kernel's default stays, and
	// only requests that fit are spliced.
	pipeSize = 1 << 20
	// maxPipesPerConn bounds the file descriptors one connection holds;
	// requests beyond it are copied.
	maxPipesPerConn = 16
	pageSize        = 4096
	// minSplicedRead is the smallest read worth splicing: below it the
	// extra system calls (fill, header, drain) cost more than the copies
	// they save (measured with qemu-img bench: 4 KiB reads 15% slower
	// spliced, 16 KiB 7% slower, 64 KiB even).
	minSplicedRead = 64 << 10
)

// errPipeFull ends a fill that the pipe cannot hold; the request is then
// copied instead.
var errPipeFull = errors.New("nbd: pipe full")

// fillError is a failure to fill a pipe, as opposed to the backend's own.
type fillError struct{ err error }

func (e *fillError) Error() string { return "nbd: fill pipe: " + e.err.Error() }
func (e *fillError) Unwrap() error { return e.err }

// pipe is a kernel pipe used to carry one reply's data.
type pipe struct {
	r, w int
	size int
}

func newPipe() (*pipe, error) {
	var fds [2]int
	// Both ends non-blocking: a full pipe must fail the fill, not hang it.
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, err
	}
	p := &pipe{r: fds[0], w: fds[1]}
	_, _ = unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pipeSize)
	size, err := unix.FcntlInt(uintptr(p.w), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		p.close()
		return nil, err
	}
	p.size = size
	return p, nil
}

func (p *pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// fits reports whether a reply of n bytes can be spliced through p: each
// piece may start and end inside a page, so leave a little room.
func (p *pipe) fits(n int) bool { return n > 0 && n <= p.size-2*pageSize }

// fillFile splices n bytes of f at off into the pipe; bytes past the end
// of the file are filled with zeros.
func (p *pipe) fillFile(f *os.File, off, n int64, zeros []byte) error {
	fd := int(f.Fd())
	for n > 0 {
		k, err := unix.Splice(fd, &off, p.w, nil, int(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return fillFailed(err)
		case k == 0: // end of file
			return p.fillZeros(n, zeros)
		}
		n -= k
	}
	return nil
}

// fillZeros writes n zero bytes into the pipe (a copy, but zero ranges in
// simple replies are rare: structured replies send holes instead).
func (p *pipe) fillZeros(n int64, zeros []byte) error {
	for n > 0 {
		k, err := unix.Write(p.w, zeros[:min(n, int64(len(zeros)))])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fillFailed(err)
		}
		n -= int64(k)
	}
	return nil
}

// fillFailed names a full (non-blocking) pipe for what it is, and tells
// any other failure apart from the backend's own errors.
func fillFailed(err error) error {
	if err == unix.EAGAIN {
		return errPipeFull
	}
	return &fillError{err}
}

// drainTo splices n bytes from the pipe into the socket behind rc,
// waiting for the socket to take them.
func (p *pipe) drainTo(rc syscall.RawConn, n int) error {
	var serr error
	err := rc.Write(func(fd uintptr) bool {
		for n > 0 {
			k, err := unix.Splice(p.r, nil, int(fd), nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN: // the socket is full; the pipe is not empty
				return false
			case err != nil:
				serr = err
				return true
			case k == 0:
				serr = io.ErrUnexpectedEOF
				return true
			}
			n -= int(k)
		}
		return true
	})
	if err != nil {
		return err
	}
	return serr
}

// pipePool holds one connection's pipes. A pipe whose contents are in an
// unknown state (a failed fill or send) is closed rather than reused.
type pipePool struct {
	mu       sync.Mutex
	free     []*pipe
	open     int
	disabled bool
}

// get returns an empty pipe that fits n bytes, or nil.
func (pp *pipePool) get(n int) *pipe {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if pp.disabled {
		return nil
	}
	if k := len(pp.free); k > 0 {
		p := pp.free[k-1]
		if !p.fits(n) {
			return nil
		}
		pp.free = pp.free[:k-1]
		return p
	}
	if pp.open >= maxPipesPerConn {
		return nil
	}
	p, err := newPipe()
	if err != nil {
		// Out of descriptors or pipe allowance: copy instead.
		pp.disabled = pp.open == 0
		return nil
	}
	pp.open++
	if !p.fits(n) {
		pp.free = append(pp.free, p)
		return nil
	}
	return p
}

// put returns an empty pipe.
func (pp *pipePool) put(p *pipe) {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if pp.open < 0 { // closed: the connection is gone
		p.close()
		return
	}
	pp.free = append(pp.free, p)
}

// discard closes a pipe that may hold data.
func (pp *pipePool) discard(p *pipe) {
	p.close()
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if pp.open > 0 {
		pp.open--
	}
}

// disable stops splicing on this connection (the backend or filesystem
// cannot do it).
func (pp *pipePool) disable() {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	pp.disabled = true
}

// closeAll closes the free pipes; pipes still out are closed as they come
// back.
func (pp *pipePool) closeAll() {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	for _, p := range pp.free {
		p.close()
	}
	pp.free, pp.open, pp.disabled = nil, -1, true
}

// spliceMark says that, in a reply queue, n bytes from pipe p go out
// before part at; last marks the pipe's final bytes, after which the pipe
// is free again.
type spliceMark struct {
	at   int
	p    *pipe
	n    int
	last bool
}
