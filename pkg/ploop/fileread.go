package ploop

import (
	"errors"
	"fmt"
	"math"
	"os"
)

// Reading by file range lets a block server move data from the page cache
// to its socket with splice instead of copying it through its own memory
// twice. The server is then holding references to page-cache pages after
// the read has returned (in a pipe or in socket buffers), so the bytes of
// a file range must not turn into something else in place: whenever space
// that held one cluster's data is reused for another cluster or for the
// BAT (compaction moves, relocating grow), the range is punched first,
// which detaches the old pages, and the new bytes go to fresh ones. A
// client write to the same cluster may still show through a reply in
// flight, as the NBD protocol allows for overlapping requests.

// ReadFile calls piece, in order, for the pieces of file that hold the
// virtual range [off, off+length): n bytes stored in f at fileOff, or n
// bytes of zeros when f is nil (bytes past the end of f read as zeros
// too). It returns errors.ErrUnsupported, before calling piece, when the
// image is opened with O_DIRECT; piece's own errors are returned as they
// are. (piece is a plain func type so that a server can name the method in
// an interface without importing this package.)
func (img *Image) ReadFile(off, length int64, piece func(f *os.File, fileOff, n int64) error) error {
	if img.closed.Load() {
		return fmt.Errorf("read %s: %w", img.path, os.ErrClosed)
	}
	f, err := pageCacheRange(img.s, off, length, img.Size())
	if err != nil {
		return err
	}
	for done := int64(0); done < length; {
		host, n := img.run(off+done, int(min(length-done, math.MaxInt32)))
		var err error
		if host == 0 {
			err = piece(nil, 0, int64(n))
		} else {
			err = piece(f, host, int64(n))
		}
		if err != nil {
			return err
		}
		done += int64(n)
	}
	return nil
}

// ReadFile is Image.ReadFile for a raw image: one piece.
func (r *Raw) ReadFile(off, length int64, piece func(f *os.File, fileOff, n int64) error) error {
	if r.closed.Load() {
		return fmt.Errorf("read %s: %w", r.path, os.ErrClosed)
	}
	f, err := pageCacheRange(r.s, off, length, r.size)
	if err != nil || length == 0 {
		return err
	}
	return piece(f, off, length)
}

// pageCacheRange returns the file behind s for ReadFile of a disk of size
// bytes, after checking the range.
func pageCacheRange(s storage, off, length, size int64) (*os.File, error) {
	f := s.pageCacheFile()
	if f == nil {
		return nil, errors.ErrUnsupported
	}
	return f, checkRange("read", off, length, size)
}

// ReadFile is Image.ReadFile through the chain: each piece comes from the
// highest delta that has it allocated. The stack's I/O lock is held until
// the last piece has been handled, so no online operation changes the
// mapping meanwhile.
func (s *Stack) ReadFile(off, length int64, piece func(f *os.File, fileOff, n int64) error) error {
	if s.direct { // every delta is opened the same way
		return errors.ErrUnsupported
	}
	defer s.end(s.begin())
	if err := s.checkOpen("read"); err != nil {
		return err
	}
	if err := checkRange("read", off, length, s.Size()); err != nil {
		return err
	}
	if err := s.readLayerFile(len(s.layers)-1, off, length, piece); err != nil {
		return fmt.Errorf("read %s at %d: %w", s.dir, off, err)
	}
	return nil
}

// readLayerFile is readLayer by file range.
func (s *Stack) readLayerFile(i int, off, length int64, piece func(f *os.File, fileOff, n int64) error) error {
	// Past a delta's size (it was frozen before a grow) there is no data
	// in it or below it.
	if end := s.layers[i].Size(); off+length > end {
		zeros := min(length, off+length-end)
		if length -= zeros; length > 0 {
			if err := s.readLayerFile(i, off, length, piece); err != nil {
				return err
			}
		}
		return piece(nil, 0, zeros)
	}
	l := s.layers[i]
	if i == 0 {
		return l.ReadFile(off, length, piece)
	}
	for done := int64(0); done < length; {
		pos := off + done
		n, alloc, err := l.Extent(pos, length-done)
		if err != nil {
			return err
		}
		if alloc {
			err = l.ReadFile(pos, n, piece)
		} else {
			err = s.readLayerFile(i-1, pos, n, piece)
		}
		if err != nil {
			return err
		}
		done += n
	}
	return nil
}
