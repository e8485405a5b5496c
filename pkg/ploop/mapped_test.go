package ploop

import (
	"bytes"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// mappedIO does what a ublk queue does with a mapper: the I/O on the file
// it is given, or ReadAt/WriteAt when it is given none.
// Its buffers are aligned, as a queue's are, so that O_DIRECT files are
// placed too.
type mappedIO struct {
	s      *Stack
	mapped atomic.Int64 // requests the mapper placed
}

func (m *mappedIO) WriteAt(p []byte, off int64) (int, error) {
	b := alignedBuffer(len(p))
	copy(b, p)
	f, fileOff, done, ok := m.s.MapWrite(b, off)
	if !ok {
		return m.s.WriteAt(p, off)
	}
	defer done()
	m.mapped.Add(1)
	return unix.Pwrite(int(f.Fd()), b, fileOff)
}

func (m *mappedIO) ReadAt(p []byte, off int64) (int, error) {
	b := alignedBuffer(len(p))
	f, fileOff, done, ok := m.s.MapRead(b, off)
	if !ok {
		return m.s.ReadAt(p, off)
	}
	defer done()
	m.mapped.Add(1)
	if f == nil {
		clear(p)
		return len(p), nil
	}
	n, err := unix.Pread(int(f.Fd()), b, fileOff)
	copy(p, b[:max(n, 0)])
	return n, err
}

func (m *mappedIO) Size() int64 { return m.s.Size() }

func TestStackMapped(t *testing.T) {
	const (
		size = 4 << 20
		cs   = 64 << 10
	)
	block := func(b byte) []byte {
		p := alignedBuffer(4096)
		for i := range p {
			p[i] = b
		}
		return p
	}
	type step struct {
		name string
		run  func(t *testing.T, s *Stack)
	}
	mapRead := func(s *Stack, off int64, n int) (*os.File, int64, func(), bool) {
		return s.MapRead(alignedBuffer(n), off)
	}
	wantRead := func(off int64, n int, ok, zeros bool) func(*testing.T, *Stack) {
		return func(t *testing.T, s *Stack) {
			f, _, done, got := mapRead(s, off, n)
			if got != ok {
				t.Fatalf("MapRead [%d,+%d): ok %v, want %v", off, n, got, ok)
			}
			if got {
				done()
				if (f == nil) != zeros {
					t.Fatalf("MapRead [%d,+%d): file %v, want zeros %v", off, n, f, zeros)
				}
			}
		}
	}
	wantWrite := func(off int64, n int, ok bool) func(*testing.T, *Stack) {
		return func(t *testing.T, s *Stack) {
			_, _, done, got := s.MapWrite(alignedBuffer(n), off)
			if got != ok {
				t.Fatalf("MapWrite [%d,+%d): ok %v, want %v", off, n, got, ok)
			}
			if got {
				done()
			}
		}
	}
	write := func(off int64, b byte) func(*testing.T, *Stack) {
		return func(t *testing.T, s *Stack) {
			if _, err := s.WriteAt(block(b), off); err != nil {
				t.Fatal(err)
			}
		}
	}
	snapshot := func(t *testing.T, s *Stack) {
		if _, _, err := s.Snapshot(); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		raw   bool
		opts  StackOptions
		steps []step
	}{
		{"fresh reads zeros, refuses writes", false, StackOptions{}, []step{
			{"read", wantRead(0, 4096, true, true)},
			{"read whole disk", wantRead(0, size, true, true)},
			{"write unallocated", wantWrite(0, 4096, false)},
			{"read past the end", wantRead(size-4096, 8192, false, false)},
		}},
		{"allocated cluster", false, StackOptions{}, []step{
			{"write", write(cs, 1)},
			{"read", wantRead(cs, 4096, true, false)},
			{"write mapped", wantWrite(cs+4096, 4096, true)},
			{"read into an unallocated cluster", wantRead(2*cs-4096, 8192, false, false)},
			{"write into an unallocated cluster", wantWrite(2*cs-4096, 8192, false)},
		}},
		{"clusters out of order in the file", false, StackOptions{}, []step{
			{"second first", write(2*cs, 2)},
			{"then first", write(cs, 1)},
			{"read across", wantRead(2*cs-4096, 8192, false, false)},
			{"write across", wantWrite(2*cs-4096, 8192, false)},
		}},
		{"clusters in order in the file", false, StackOptions{}, []step{
			{"first", write(cs, 1)},
			{"second", write(2*cs, 2)},
			{"read across", wantRead(2*cs-4096, 8192, true, false)},
			{"write across", wantWrite(2*cs-4096, 8192, true)},
		}},
		{"after a snapshot", false, StackOptions{}, []step{
			{"write", write(0, 1)},
			{"snapshot", snapshot},
			{"read from below", wantRead(0, 4096, true, false)},
			{"write needs a copy-up", wantWrite(0, 4096, false)},
			{"zeros through every delta", wantRead(cs, 4096, true, true)},
			{"copy-up", write(0, 3)},
			{"write now mapped", wantWrite(0, 4096, true)},
		}},
		{"raw base", true, StackOptions{}, []step{
			{"read", wantRead(0, 4096, true, false)},
			{"write", wantWrite(0, 4096, true)},
			{"snapshot", snapshot},
			{"write needs a copy-up", wantWrite(0, 4096, false)},
			{"read from the base", wantRead(0, 4096, true, false)},
		}},
		{"read-only", false, StackOptions{ReadOnly: true}, []step{
			{"read", wantRead(0, 4096, true, true)},
			{"write", wantWrite(0, 4096, false)},
		}},
		{"direct", false, StackOptions{Direct: true}, []step{
			{"write", write(0, 1)},
			{"aligned", wantRead(0, 4096, true, false)},
			{"unaligned offset", wantRead(512, 4096, false, false)},
			{"unaligned buffer", func(t *testing.T, s *Stack) {
				if _, _, _, ok := s.MapRead(alignedBuffer(8192)[512:4608], 0); ok {
					t.Fatal("MapRead placed an unaligned buffer on an O_DIRECT file")
				}
			}},
		}},
		{"faults", false, StackOptions{faults: func(string, string) error { return nil }}, []step{
			{"write", write(0, 1)},
			{"read", wantRead(0, 4096, false, false)},
			{"write mapped", wantWrite(0, 4096, false)},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "vol")
			if err := InitStack(dir, InitOptions{Size: size, ClusterSize: cs, RawBase: tc.raw}); err != nil {
				t.Fatal(err)
			}
			s := mustOpenStack(t, dir, tc.opts)
			defer s.Close()
			for _, st := range tc.steps {
				t.Run(st.name, func(t *testing.T) { st.run(t, s) })
			}
		})
	}
}

// TestStackMappedHolds checks what a placed request holds until done: the
// chain (an online operation waits) and, for a write, its cluster; and
// that a mapper never waits for an operation that is switching the chain.
func TestStackMappedHolds(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	if err := InitStack(dir, InitOptions{Size: 1 << 20, ClusterSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	s := mustOpenStack(t, dir, StackOptions{})
	defer s.Close()
	want := bytes.Repeat([]byte{7}, 4096)
	if _, err := s.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	got := alignedBuffer(4096)
	f, off, done, ok := s.MapRead(got, 0)
	if !ok || f == nil {
		t.Fatalf("MapRead of a written block: file %v ok %v", f, ok)
	}
	if s.io.TryLock() {
		t.Fatal("the chain could be switched under a placed read")
	}
	if _, err := unix.Pread(int(f.Fd()), got, off); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("placed read: %v, data equal %v", err, bytes.Equal(got, want))
	}
	done()
	if !s.io.TryLock() {
		t.Fatal("done did not release the chain")
	}
	if _, _, _, ok := s.MapRead(got, 0); ok {
		t.Fatal("MapRead waited for, or ran under, a chain switch")
	}
	if _, _, _, ok := s.MapWrite(got, 0); ok {
		t.Fatal("MapWrite waited for, or ran under, a chain switch")
	}
	s.io.Unlock()

	_, _, done, ok = s.MapWrite(got, 0)
	if !ok {
		t.Fatal("MapWrite of an allocated block refused")
	}
	lk := &s.topImage().clusterLocks[0]
	if lk.TryLock() {
		t.Fatal("a placed write does not hold its cluster")
	}
	done()
	if !lk.TryLock() {
		t.Fatal("done did not release the cluster")
	}
	if _, _, _, ok := s.MapWrite(got, 0); ok {
		t.Fatal("MapWrite waited for, or ran beside, a locked cluster")
	}
	lk.Unlock()
}

// TestDiskMapped: an image or a raw file served alone places its requests
// as a one-delta stack does, and the bytes are where it says.
func TestDiskMapped(t *testing.T) {
	type mapper interface {
		WriteAt(p []byte, off int64) (int, error)
		MapRead(p []byte, off int64) (*os.File, int64, func(), bool)
		MapWrite(p []byte, off int64) (*os.File, int64, func(), bool)
		Close() error
	}
	const size, cs = 1 << 20, 64 << 10
	for _, tc := range []struct {
		name string
		open func(t *testing.T) mapper
		// unallocated: a write where nothing was written is placed
		unallocated bool
	}{
		{"image", func(t *testing.T) mapper { img, _ := mustCreate(t, size, cs); return img }, false},
		{"raw", func(t *testing.T) mapper {
			p := filepath.Join(t.TempDir(), "disk.raw")
			if err := os.WriteFile(p, make([]byte, size), 0o600); err != nil {
				t.Fatal(err)
			}
			r, err := OpenRaw(p, false)
			if err != nil {
				t.Fatal(err)
			}
			return r
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := tc.open(t)
			defer d.Close()
			b := alignedBuffer(4096)
			if _, _, _, ok := d.MapWrite(b, cs); ok != tc.unallocated {
				t.Fatalf("MapWrite where nothing was written: ok %v, want %v", ok, tc.unallocated)
			}
			if _, _, _, ok := d.MapRead(b, size); ok {
				t.Fatal("MapRead past the end placed")
			}
			want := bytes.Repeat([]byte{9}, 4096)
			if _, err := d.WriteAt(want, cs+4096); err != nil {
				t.Fatal(err)
			}
			for _, what := range []string{"read", "write"} {
				mapf := d.MapRead
				if what == "write" {
					mapf = d.MapWrite
				}
				f, off, done, ok := mapf(b, cs+4096)
				if !ok || f == nil {
					t.Fatalf("Map%s of a written block: file %v ok %v", what, f, ok)
				}
				clear(b)
				if _, err := unix.Pread(int(f.Fd()), b, off); err != nil || !bytes.Equal(b, want) {
					t.Fatalf("Map%s placed the block where it is not (err %v)", what, err)
				}
				done()
			}
		})
	}
}
