package ploop

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Raw is a plain raw image file: byte i of the virtual disk is byte i of the
// file. It offers the same methods as Image so that both can be served as a
// block device, and it is the "Plain" base a ploop stack may sit on. Holes
// in the file are unallocated ranges.
type Raw struct {
	path     string
	s        storage
	size     int64
	readOnly bool
	closed   atomic.Bool
}

// OpenRaw opens a raw image file with buffered I/O. Its virtual size is the
// file size at open.
func OpenRaw(path string, readOnly bool) (*Raw, error) {
	return OpenRawWith(path, OpenOptions{ReadOnly: readOnly})
}

// OpenRawWith opens a raw image file; opts.Direct selects O_DIRECT.
func OpenRawWith(path string, opts OpenOptions) (*Raw, error) {
	if path == "" {
		return nil, fmt.Errorf("open raw image: empty path: %w", unix.EINVAL)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open raw image: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("open raw image %s: not a regular file: %w", path, unix.EINVAL)
	}
	s, err := openStorage(path, opts.ReadOnly, opts.Direct)
	if err != nil {
		return nil, fmt.Errorf("open raw image: %w", err)
	}
	if s, err = opts.faults.wrap(s, path); err != nil {
		return nil, fmt.Errorf("open raw image: %w", err)
	}
	if !opts.ReadOnly {
		if err := s.LockExclusive(); err != nil {
			s.Close()
			return nil, fmt.Errorf("open raw image %s: another process has it open for writing: %w", path, err)
		}
	}
	size, err := s.Size()
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("open raw image %s: %w", path, err)
	}
	return &Raw{path: path, s: s, size: size, readOnly: opts.ReadOnly}, nil
}

// Size is the virtual size in bytes.
func (r *Raw) Size() int64 { return r.size }

// ReadOnly reports whether writes are refused.
func (r *Raw) ReadOnly() bool { return r.readOnly }

// Path is the file the image was opened from.
func (r *Raw) Path() string { return r.path }

// ReadAt reads len(p) bytes at off; the range must lie inside the image.
func (r *Raw) ReadAt(p []byte, off int64) (int, error) {
	if err := r.checkRead("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := r.s.ReadAt(p, off)
	if err != nil {
		// The file may have been truncated behind our back: report it
		// rather than pretend.
		return n, fmt.Errorf("read %s at %d: %w", r.path, off, err)
	}
	return n, nil
}

// WriteAt writes len(p) bytes at off; the range must lie inside the image.
func (r *Raw) WriteAt(p []byte, off int64) (int, error) {
	if err := r.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := r.s.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write %s at %d: %w", r.path, off, err)
	}
	return n, nil
}

// Flush makes every completed write durable.
func (r *Raw) Flush() error {
	if r.closed.Load() {
		return fmt.Errorf("flush %s: %w", r.path, os.ErrClosed)
	}
	if r.readOnly {
		return nil
	}
	if err := r.s.Sync(); err != nil {
		return fmt.Errorf("flush %s: %w", r.path, err)
	}
	return nil
}

// Discard deallocates the range; it reads back as zeros.
func (r *Raw) Discard(off, length int64) error {
	if err := r.checkWrite("discard", off, length); err != nil {
		return err
	}
	if err := r.s.PunchHole(off, length); err != nil {
		return fmt.Errorf("discard %s [%d,+%d): %w", r.path, off, length, err)
	}
	return nil
}

// WriteZeroes makes the range read as zeros. With noHole the range stays
// allocated; otherwise it is deallocated.
func (r *Raw) WriteZeroes(off, length int64, noHole bool) error {
	if err := r.checkWrite("write zeroes", off, length); err != nil {
		return err
	}
	var err error
	if noHole {
		err = r.s.ZeroRange(off, length)
	} else {
		err = r.s.PunchHole(off, length)
		if errors.Is(err, unix.EOPNOTSUPP) {
			err = r.s.ZeroRange(off, length)
		}
	}
	if err != nil {
		return fmt.Errorf("write zeroes %s [%d,+%d): %w", r.path, off, length, err)
	}
	return nil
}

// Extent reports the run of equally allocated bytes starting at off, at most
// length bytes long, from the file's data and holes.
func (r *Raw) Extent(off, length int64) (int64, bool, error) {
	if err := r.checkRead("extent", off, length); err != nil {
		return 0, false, err
	}
	if length == 0 {
		return 0, false, fmt.Errorf("extent of %s at %d: zero length: %w", r.path, off, unix.EINVAL)
	}
	data, err := r.s.NextData(off)
	switch {
	case errors.Is(err, unix.ENXIO):
		// No data at or after off: a hole to the end.
		return length, false, nil
	case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP):
		// The filesystem cannot tell: call everything allocated.
		return length, true, nil
	case err != nil:
		return 0, false, fmt.Errorf("extent of %s at %d: %w", r.path, off, err)
	}
	if data > off {
		return min(data-off, length), false, nil
	}
	hole, err := r.s.NextHole(off)
	if err != nil {
		return 0, false, fmt.Errorf("extent of %s at %d: %w", r.path, off, err)
	}
	if hole <= off {
		return length, true, nil
	}
	return min(hole-off, length), true, nil
}

// Close flushes a writable image and closes the file. Every call after
// Close fails with an error wrapping os.ErrClosed.
func (r *Raw) Close() error {
	ferr := r.Flush()
	if !r.closed.CompareAndSwap(false, true) {
		return fmt.Errorf("close %s: %w", r.path, os.ErrClosed)
	}
	if err := r.s.Close(); err != nil {
		return fmt.Errorf("close %s: %w", r.path, err)
	}
	return ferr
}

func (r *Raw) checkWrite(op string, off, length int64) error {
	if r.readOnly {
		return fmt.Errorf("%s %s: image is read-only: %w", op, r.path, unix.EPERM)
	}
	return r.checkRead(op, off, length)
}

func (r *Raw) checkRead(op string, off, length int64) error {
	if r.closed.Load() {
		return fmt.Errorf("%s %s: %w", op, r.path, os.ErrClosed)
	}
	return checkRange(op, off, length, r.size)
}

// checkRange refuses ranges that do not lie inside [0, size).
func checkRange(op string, off, length, size int64) error {
	if off < 0 || length < 0 || off > size || length > size-off {
		return fmt.Errorf("%s [%d,+%d) outside the image size %d: %w", op, off, length, size, unix.EINVAL)
	}
	return nil
}
