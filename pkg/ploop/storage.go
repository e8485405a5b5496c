package ploop

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/flock"
)

// storage is the I/O layer under a delta or a raw image: positioned reads
// and writes on one host file, durability, and space reclamation. It exists
// so that the format code never touches file descriptors directly and so that
// O_DIRECT (which needs aligned buffers, offsets and lengths) stays in one
// place. Errors wrap the underlying syscall errors.
type storage interface {
	// ReadAt behaves like io.ReaderAt: a short read at end of file returns
	// io.EOF.
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// PunchHole deallocates the range, which then reads as zeros; the file
	// size does not change.
	PunchHole(off, length int64) error
	// ZeroRange makes the range read as zeros and keeps it allocated.
	ZeroRange(off, length int64) error
	// NextData and NextHole are lseek(SEEK_DATA) and lseek(SEEK_HOLE).
	NextData(off int64) (int64, error)
	NextHole(off int64) (int64, error)
	Size() (int64, error)
	Truncate(size int64) error
	// LockExclusive takes a non-blocking exclusive flock on the file, so
	// that two processes cannot write one image; it fails with
	// EWOULDBLOCK when another holds it.
	LockExclusive() error
	// pageCacheFile is the open file when its reads go through the page
	// cache, which is what lets a server splice them to a socket; nil for
	// O_DIRECT storage.
	pageCacheFile() *os.File
	// ioFile is the open file when a server may read p from it or write
	// p to it at off itself (mapped.go): always for buffered storage,
	// only aligned requests for O_DIRECT; nil otherwise.
	ioFile(p []byte, off int64) *os.File
	Close() error
}

// directAlign is the buffer, offset and length alignment used for O_DIRECT.
// 4096 covers every common logical block size (512 and 4K sector disks).
const directAlign = 4096

// openStorage opens path for buffered or direct I/O.
func openStorage(path string, readOnly, direct bool) (storage, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	flags |= unix.O_CLOEXEC
	if !direct {
		f, err := os.OpenFile(path, flags, 0)
		if err != nil {
			return nil, err
		}
		return &bufferedFile{file{f}}, nil
	}
	f, err := os.OpenFile(path, flags|unix.O_DIRECT, 0)
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("open %s with O_DIRECT (the filesystem may not support direct I/O): %w", path, err)
		}
		return nil, err
	}
	d := &directFile{file: file{f}, path: path}
	d.bounce.New = newBounceBuffer
	return d, nil
}

// file holds what buffered and O_DIRECT storage do alike: everything but
// the data path.
type file struct {
	f *os.File
}

func (h file) Sync() error                       { return fdatasync(h.f) }
func (h file) PunchHole(off, n int64) error      { return punchHole(h.f, off, n) }
func (h file) NextData(off int64) (int64, error) { return seek(h.f, off, unix.SEEK_DATA) }
func (h file) NextHole(off int64) (int64, error) { return seek(h.f, off, unix.SEEK_HOLE) }
func (h file) Size() (int64, error)              { return fileSize(h.f) }
func (h file) Truncate(size int64) error         { return h.f.Truncate(size) }
func (h file) LockExclusive() error              { return lockExclusive(h.f) }
func (h file) Close() error                      { return h.f.Close() }

// bufferedFile is storage through the page cache.
type bufferedFile struct {
	file
}

func (b *bufferedFile) pageCacheFile() *os.File                  { return b.f }
func (b *bufferedFile) ioFile([]byte, int64) *os.File            { return b.f }
func (b *bufferedFile) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *bufferedFile) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *bufferedFile) ZeroRange(off, n int64) error {
	return zeroRange(b.f, off, n, b.WriteAt)
}

// directFile is storage opened with O_DIRECT. Requests that are aligned in
// memory, offset and length go straight to the device; others go through an
// aligned bounce buffer, with a read-modify-write of the edge blocks for
// writes. Edge blocks are locked (striped by block number) so that two
// unaligned writes to different bytes of one block do not undo each other.
type directFile struct {
	file
	path  string
	edges [64]sync.Mutex
	// bounce holds aligned buffers for unaligned requests; per file, so
	// the package keeps no mutable state of its own.
	bounce sync.Pool
}

// maxBounce bounds the bounce buffer of one request; longer requests are
// split.
const maxBounce = 1 << 20

func newBounceBuffer() any { b := alignedBuffer(maxBounce + 2*directAlign); return &b }

// alignedBuffer returns a slice of n bytes whose address is a multiple of
// directAlign.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+directAlign)
	a := int(uintptr(unsafe.Pointer(&b[0])) & (directAlign - 1))
	skip := 0
	if a != 0 {
		skip = directAlign - a
	}
	return b[skip : skip+n : skip+n]
}

func isAligned(p []byte, off int64) bool {
	if len(p) == 0 {
		return true
	}
	return off%directAlign == 0 && len(p)%directAlign == 0 &&
		uintptr(unsafe.Pointer(&p[0]))&(directAlign-1) == 0
}

func (d *directFile) pageCacheFile() *os.File { return nil }

func (d *directFile) ioFile(p []byte, off int64) *os.File {
	if !isAligned(p, off) {
		return nil
	}
	return d.f
}

func (d *directFile) ReadAt(p []byte, off int64) (int, error) {
	if isAligned(p, off) {
		return d.f.ReadAt(p, off)
	}
	bp := d.bounce.Get().(*[]byte)
	defer d.bounce.Put(bp)
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		chunk := min(len(p)-done, maxBounce)
		start := pos &^ (directAlign - 1)
		end := (pos + int64(chunk) + directAlign - 1) &^ (directAlign - 1)
		buf := (*bp)[:end-start]
		n, err := d.f.ReadAt(buf, start)
		skip := int(pos - start)
		if n > skip {
			done += copy(p[done:done+chunk], buf[skip:n])
		}
		if err != nil {
			return done, err
		}
		if n < len(buf) {
			return done, io.EOF
		}
	}
	return done, nil
}

func (d *directFile) WriteAt(p []byte, off int64) (int, error) {
	if isAligned(p, off) {
		return d.f.WriteAt(p, off)
	}
	bp := d.bounce.Get().(*[]byte)
	defer d.bounce.Put(bp)
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		chunk := min(len(p)-done, maxBounce)
		if err := d.writeChunk((*bp), p[done:done+chunk], pos); err != nil {
			return done, err
		}
		done += chunk
	}
	return done, nil
}

// writeChunk writes p (at most maxBounce bytes) at off through the bounce
// buffer, reading the partial first and last blocks first.
func (d *directFile) writeChunk(bounce, p []byte, off int64) error {
	start := off &^ (directAlign - 1)
	end := (off + int64(len(p)) + directAlign - 1) &^ (directAlign - 1)
	buf := bounce[:end-start]
	headPartial := off != start
	tailPartial := off+int64(len(p)) != end
	first, last := start/directAlign, (end-1)/directAlign
	locks := []*sync.Mutex{}
	if headPartial || (tailPartial && first == last) {
		locks = append(locks, &d.edges[first%int64(len(d.edges))])
	}
	if tailPartial && last != first {
		m := &d.edges[last%int64(len(d.edges))]
		if len(locks) == 0 || locks[0] != m {
			locks = append(locks, m)
		}
	}
	// Lock in a fixed order so two writers cannot deadlock.
	if len(locks) == 2 && uintptr(unsafe.Pointer(locks[0])) > uintptr(unsafe.Pointer(locks[1])) {
		locks[0], locks[1] = locks[1], locks[0]
	}
	for _, m := range locks {
		m.Lock()
	}
	defer func() {
		for _, m := range locks {
			m.Unlock()
		}
	}()
	if headPartial {
		if err := d.readBlock(buf[:directAlign], start); err != nil {
			return err
		}
	}
	if tailPartial && (!headPartial || last != first) {
		if err := d.readBlock(buf[len(buf)-directAlign:], end-directAlign); err != nil {
			return err
		}
	}
	copy(buf[off-start:], p)
	_, err := d.f.WriteAt(buf, start)
	return err
}

// readBlock reads one aligned block, treating bytes past end of file as
// zeros.
func (d *directFile) readBlock(b []byte, off int64) error {
	n, err := d.f.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	clear(b[n:])
	return nil
}

func (d *directFile) ZeroRange(off, n int64) error {
	return zeroRange(d.f, off, n, d.WriteAt)
}

func fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: err}
		}
		return nil
	}
}

func fallocate(f *os.File, mode uint32, off, n int64) error {
	for {
		err := unix.Fallocate(int(f.Fd()), mode, off, n)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "fallocate", Path: f.Name(), Err: err}
		}
		return nil
	}
}

func punchHole(f *os.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	return fallocate(f, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// zeroRange uses FALLOC_FL_ZERO_RANGE where the filesystem has it and
// writes zeros otherwise.
func zeroRange(f *os.File, off, n int64, write func([]byte, int64) (int, error)) error {
	if n <= 0 {
		return nil
	}
	err := fallocate(f, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil || !(errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)) {
		return err
	}
	zeros := alignedBuffer(int(min(n, maxBounce)))
	for n > 0 {
		c := min(n, int64(len(zeros)))
		if _, err := write(zeros[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

func seek(f *os.File, off int64, whence int) (int64, error) {
	pos, err := unix.Seek(int(f.Fd()), off, whence)
	if err != nil {
		return 0, &os.PathError{Op: "lseek", Path: f.Name(), Err: err}
	}
	return pos, nil
}

func fileSize(f *os.File) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, &os.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	return st.Size, nil
}

// lockExclusive is flock.Exclusive: it waits out a forked child's copy of
// a lock this process has just let go.
func lockExclusive(f *os.File) error { return flock.Exclusive(f) }
