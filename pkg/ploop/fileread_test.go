package ploop

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// collectFile reads [off, off+length) through ReadFile, pread-ing each
// piece, so it must equal ReadAt.
func collectFile(t *testing.T, r Disk, off, length int64) []byte {
	t.Helper()
	var out []byte
	err := r.ReadFile(off, length, func(f *os.File, fileOff, n int64) error {
		if n <= 0 {
			t.Fatalf("piece of %d bytes", n)
		}
		b := make([]byte, n)
		if f != nil {
			if k, err := f.ReadAt(b, fileOff); err != nil && !(errors.Is(err, io.EOF) && k >= 0) {
				return err
			}
		}
		out = append(out, b...)
		return nil
	})
	if err != nil {
		t.Fatalf("ReadFile(%d, %d): %v", off, length, err)
	}
	return out
}

func TestReadFileMatchesReadAt(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	dir := filepath.Join(t.TempDir(), "stack")
	mustInit(t, dir, true) // raw base
	s := mustOpenStack(t, dir, StackOptions{})
	defer s.Close()
	// Base data, a snapshot, sparse writes on top (partial clusters copy
	// up), then a grow so the top is larger than the deltas below.
	s.WriteAt(randomBytes(rng, 300<<10), 10<<10)
	if _, _, err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		off := rng.Int64N(stackSize - 5000)
		s.WriteAt(randomBytes(rng, 1+rng.IntN(5000)), off)
	}
	if _, err := s.Grow(stackSize + 1<<20); err != nil {
		t.Fatal(err)
	}
	s.WriteAt(randomBytes(rng, 7000), stackSize+100)
	img, _ := mustCreate(t, 1<<20, stackCluster)
	defer img.Close()
	img.WriteAt(randomBytes(rng, 5000), 40000)
	img.WriteAt(randomBytes(rng, 100), 900000)

	for _, tc := range []struct {
		name string
		r    Disk
	}{{"stack", s}, {"image", img}} {
		t.Run(tc.name, func(t *testing.T) {
			size := tc.r.Size()
			ranges := [][2]int64{{0, size}, {0, 1}, {size - 1, 1}, {stackCluster - 1, 2}}
			for range 200 {
				off := rng.Int64N(size)
				ranges = append(ranges, [2]int64{off, 1 + rng.Int64N(size-off)})
			}
			for _, rg := range ranges {
				want := make([]byte, rg[1])
				if _, err := tc.r.ReadAt(want, rg[0]); err != nil {
					t.Fatal(err)
				}
				if got := collectFile(t, tc.r, rg[0], rg[1]); !bytes.Equal(got, want) {
					t.Fatalf("ReadFile(%d, %d): %s", rg[0], rg[1], firstDiff(got, want))
				}
			}
			if err := tc.r.ReadFile(size-1, 2, func(*os.File, int64, int64) error { return nil }); err == nil {
				t.Fatal("ReadFile past the end succeeded")
			}
		})
	}
}

func TestReadFileUnsupportedWithDirectIO(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.hds")
	img, err := Create(path, CreateOptions{Size: 1 << 20, ClusterSize: stackCluster, Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	called := false
	err = img.ReadFile(0, 4096, func(*os.File, int64, int64) error { called = true; return nil })
	if !errors.Is(err, errors.ErrUnsupported) || called {
		t.Fatalf("ReadFile on O_DIRECT image: %v (piece called: %v)", err, called)
	}
}

// spliceToPipe takes page references to the file range of virtual
// [off, off+n), as a server's spliced read reply does, and returns the
// pipe's read end.
func spliceToPipe(t *testing.T, r Disk, off, n int64) int {
	t.Helper()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, 1<<20); err != nil {
		t.Fatal(err)
	}
	err := r.ReadFile(off, n, func(f *os.File, fileOff, n int64) error {
		if f == nil {
			t.Fatal("the range is not allocated")
		}
		for n > 0 {
			k, err := unix.Splice(int(f.Fd()), &fileOff, fds[1], nil, int(n), unix.SPLICE_F_MOVE)
			if err != nil {
				return err
			}
			n -= k
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return fds[0]
}

func readPipe(t *testing.T, fd int, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	for done := 0; done < n; {
		k, err := unix.Read(fd, b[done:])
		if err != nil || k == 0 {
			t.Fatalf("read pipe: %d, %v", k, err)
		}
		done += k
	}
	return b
}

// TestSplicedPagesKeepContents: page-cache pages a reader has spliced
// away (a read reply still in a socket) must not change when compaction
// or a relocating grow reuses their file space for other data or the BAT.
func TestSplicedPagesKeepContents(t *testing.T) {
	t.Run("compact", func(t *testing.T) {
		img, _ := mustCreate(t, 1<<20, stackCluster)
		defer img.Close()
		// Cluster 0 is allocated but all zeros; cluster 1 sits at the
		// tail, so compaction moves it into cluster 0's place.
		if err := img.WriteZeroes(0, stackCluster, true); err != nil {
			t.Fatal(err)
		}
		data := bytes.Repeat([]byte{0xab}, stackCluster)
		img.WriteAt(data, stackCluster)
		fd := spliceToPipe(t, img, 0, stackCluster)
		res, err := img.Compact()
		if err != nil || res.MovedClusters != 1 {
			t.Fatalf("compact: %+v %v", res, err)
		}
		if got := readPipe(t, fd, stackCluster); !bytes.Equal(got, make([]byte, stackCluster)) {
			t.Fatalf("a reply of zeros read before compaction changed: %s", firstDiff(got, make([]byte, stackCluster)))
		}
	})
	t.Run("grow", func(t *testing.T) {
		img, _ := mustCreate(t, 1<<20, stackCluster)
		defer img.Close()
		data := bytes.Repeat([]byte{0xcd}, stackCluster)
		img.WriteAt(data, 0) // the first data cluster: in the way of a larger BAT
		fd := spliceToPipe(t, img, 0, stackCluster)
		if err := img.Grow(600 << 20); err != nil {
			t.Fatal(err)
		}
		if img.Header().DataOff == 1*stackCluster/SectorSize {
			t.Fatal("the grow did not relocate")
		}
		if got := readPipe(t, fd, stackCluster); !bytes.Equal(got, data) {
			t.Fatalf("a reply read before the grow changed: %s", firstDiff(got, data))
		}
	})
}
