package ploop

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func newRawFile(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

func TestRaw(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			const size = 8 << 20
			p := newRawFile(t, size)
			r, err := OpenRawWith(p, OpenOptions{Direct: direct})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Size() != size || r.ReadOnly() {
				t.Fatalf("size %d readonly %v", r.Size(), r.ReadOnly())
			}
			// A fresh sparse file is one hole.
			n, alloc, err := r.Extent(0, size)
			if err != nil || alloc || n != size {
				t.Fatalf("extent of empty file: %d %v %v", n, alloc, err)
			}
			data := bytes.Repeat([]byte("0123456789abcdef"), 6250) // not a multiple of 4096
			if _, err := r.WriteAt(data, 1<<20+7); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if _, err := r.ReadAt(got, 1<<20+7); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back: %v", err)
			}
			n, alloc, err = r.Extent(0, size)
			if err != nil || alloc || n != 1<<20 {
				t.Fatalf("extent before data: %d %v %v", n, alloc, err)
			}
			n, alloc, err = r.Extent(1<<20, size-1<<20)
			if err != nil || !alloc || n <= 0 || n > 1<<20 {
				t.Fatalf("extent of data: %d %v %v", n, alloc, err)
			}
			if err := r.Flush(); err != nil {
				t.Fatal(err)
			}
			// Discard reads back zeros and leaves a hole.
			if err := r.Discard(1<<20, 64<<10); err != nil {
				t.Fatal(err)
			}
			if _, err := r.ReadAt(got, 1<<20+7); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:64<<10-7], make([]byte, 64<<10-7)) || !bytes.Equal(got[64<<10-7:], data[64<<10-7:]) {
				t.Fatal("discard did not zero exactly its range")
			}
			if _, alloc, _ := r.Extent(1<<20, 4096); alloc {
				t.Fatal("discarded range still allocated")
			}
			// WriteZeroes with noHole keeps the range allocated.
			if err := r.WriteZeroes(4<<20, 1<<20, true); err != nil {
				t.Fatal(err)
			}
			// ext4 reports zeroed (unwritten) extents as holes to
			// SEEK_DATA, so look at the blocks the file holds instead.
			if b := allocatedBytes(t, p); b < 1<<20 {
				t.Fatalf("WriteZeroes(noHole) left a hole: %d bytes allocated", b)
			}
			if err := r.WriteZeroes(1<<20, 1<<20, false); err != nil {
				t.Fatal(err)
			}
			if _, err := r.ReadAt(got, 1<<20+7); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
				t.Fatal("WriteZeroes did not zero")
			}
			// Range errors.
			if _, err := r.ReadAt(make([]byte, 2), size-1); !errors.Is(err, syscall.EINVAL) {
				t.Fatalf("read past end: %v", err)
			}
			if _, err := r.WriteAt(make([]byte, 1), -1); !errors.Is(err, syscall.EINVAL) {
				t.Fatalf("write at -1: %v", err)
			}
			if err := r.Discard(size, 1); !errors.Is(err, syscall.EINVAL) {
				t.Fatalf("discard past end: %v", err)
			}
		})
	}
}

func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestRawReadOnly(t *testing.T) {
	p := newRawFile(t, 1<<20)
	r, err := OpenRaw(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if !r.ReadOnly() {
		t.Fatal("not read-only")
	}
	if _, err := r.WriteAt([]byte{1}, 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write: %v", err)
	}
	if err := r.Discard(0, 512); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("discard: %v", err)
	}
	if err := r.WriteZeroes(0, 512, false); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write zeroes: %v", err)
	}
	if _, err := OpenRaw(filepath.Join(t.TempDir(), "missing"), true); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("open missing: %v", err)
	}
	if _, err := OpenRaw(t.TempDir(), true); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("open directory: %v", err)
	}
}

// TestDirectUnalignedConcurrent checks the read-modify-write path of O_DIRECT
// storage: unaligned writes to different bytes of the same blocks from many
// goroutines must all survive.
func TestDirectUnalignedConcurrent(t *testing.T) {
	p := newRawFile(t, 1<<20)
	s, err := openStorage(p, false, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const writers = 16
	errs := make(chan error, writers)
	for w := range writers {
		go func() {
			var err error
			for i := range 64 {
				off := int64(i*8192 + w*100 + 50)
				if _, e := s.WriteAt(bytes.Repeat([]byte{byte(w + 1)}, 100), off); e != nil && err == nil {
					err = e
				}
			}
			errs <- err
		}()
	}
	for range writers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 1<<20)
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i := range 64 {
		for w := range writers {
			off := i*8192 + w*100 + 50
			if !bytes.Equal(got[off:off+100], bytes.Repeat([]byte{byte(w + 1)}, 100)) {
				t.Fatalf("block %d writer %d lost", i, w)
			}
		}
	}
}
