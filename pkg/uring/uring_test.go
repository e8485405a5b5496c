package uring

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// newRing gives the test a ring. A kernel built without io_uring or a
// policy that refuses it (a container's seccomp profile, the
// kernel.io_uring_disabled sysctl) skips the test with the reason (fails
// it in CI): the storage then runs on pread and pwrite, which the other
// packages test.
// Any other failure fails.
func newRing(t *testing.T, entries uint32) *Ring {
	t.Helper()
	r, err := New(entries)
	skipIfRefused(t, err)
	if err != nil {
		t.Fatalf("New(%d): %v", entries, err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// skipIfRefused skips when io_uring is refused here, except in CI
// (CI=true), where that fails the test with the reason instead.
func skipIfRefused(t *testing.T, err error) {
	t.Helper()
	if !Refused(err) {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("this kernel or its policy refuses io_uring (CI=true never skips): %v", err)
	}
	t.Skipf("this kernel or its policy refuses io_uring: %v", err)
}

func aligned(n int) []byte {
	b := make([]byte, n+4096)
	skip := (4096 - int(uintptr(unsafe.Pointer(&b[0]))&4095)) & 4095
	return b[skip : skip+n : skip+n]
}

func TestNewRejectsBadSizes(t *testing.T) {
	for _, n := range []uint32{0, 3, 100, 8192} {
		if r, err := New(n); err == nil {
			r.Close()
			t.Errorf("New(%d) succeeded", n)
		}
	}
}

func TestReadWriteRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name   string
		direct bool
		size   int
	}{
		{"buffered 1 byte", false, 1},
		{"buffered 4 KiB", false, 4096},
		{"buffered 3 MiB", false, 3 << 20},
		{"direct 4 KiB", true, 4096},
		{"direct 1 MiB", true, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRing(t, 8)
			path := filepath.Join(t.TempDir(), "f")
			flags := os.O_RDWR | os.O_CREATE
			if tc.direct {
				flags |= unix.O_DIRECT
			}
			f, err := os.OpenFile(path, flags, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			want := aligned(tc.size)
			for i := range want {
				want[i] = byte(i*7 + 1)
			}
			off := int64(8192)
			if n, err := r.WriteAt(int(f.Fd()), want, off); err != nil || n != len(want) {
				t.Fatalf("WriteAt = %d, %v", n, err)
			}
			got := aligned(tc.size)
			if n, err := r.ReadAt(int(f.Fd()), got, off); err != nil || n != len(got) {
				t.Fatalf("ReadAt = %d, %v", n, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("read back differs from what was written")
			}
			// What pread sees agrees: the ring wrote the file, not a copy.
			plain := aligned(tc.size)
			if _, err := f.ReadAt(plain, off); err != nil || !bytes.Equal(plain, want) {
				t.Fatalf("pread after ring write: %v, equal %v", err, bytes.Equal(plain, want))
			}
		})
	}
}

func TestReadAtEndOfFile(t *testing.T) {
	r := newRing(t, 4)
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, []byte("0123456789"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, tc := range []struct {
		off     int64
		n       int
		wantN   int
		wantErr error
	}{
		{0, 10, 10, nil},
		{4, 10, 6, io.EOF},
		{10, 4, 0, io.EOF},
		{100, 4, 0, io.EOF},
	} {
		b := make([]byte, tc.n)
		n, err := r.ReadAt(int(f.Fd()), b, tc.off)
		if n != tc.wantN || !errors.Is(err, tc.wantErr) {
			t.Errorf("ReadAt(%d bytes at %d) = %d, %v; want %d, %v", tc.n, tc.off, n, err, tc.wantN, tc.wantErr)
		}
	}
}

func TestErrorsComeBackAsErrno(t *testing.T) {
	r := newRing(t, 4)
	f, err := os.Open(filepath.Join(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := r.ReadAt(int(f.Fd()), make([]byte, 10), 0); !errors.Is(err, unix.EISDIR) {
		t.Errorf("read of a directory: %v, want EISDIR", err)
	}
	ro, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := r.WriteAt(int(ro.Fd()), []byte("x"), 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("write to a read-only fd: %v, want EBADF", err)
	}
	if _, err := r.WriteAt(-1, []byte("x"), 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("write to fd -1: %v, want EBADF", err)
	}
}

// TestConcurrentWritersKeepTheirData runs more goroutines than the ring has
// slots, each writing and reading back its own blocks with O_DIRECT: every
// completion must reach the request it belongs to.
func TestConcurrentWritersKeepTheirData(t *testing.T) {
	r := newRing(t, 8)
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "f"), os.O_RDWR|os.O_CREATE|unix.O_DIRECT, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const workers, rounds, block = 32, 200, 4096
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf, back := aligned(block), aligned(block)
			for i := range rounds {
				slot := int64(rng.IntN(16))
				off := (int64(w)*16 + slot) * block
				for j := range buf {
					buf[j] = byte(w ^ i ^ j)
				}
				if _, err := r.WriteAt(int(f.Fd()), buf, off); err != nil {
					errs <- err
					return
				}
				if _, err := r.ReadAt(int(f.Fd()), back, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, back) {
					errs <- fmt.Errorf("worker %d round %d: block at %d reads back other data", w, i, off)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestCloseWaitsAndRefuses(t *testing.T) {
	r := newRing(t, 4)
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "f"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each either completes or is refused; none hangs or crashes.
			if _, err := r.WriteAt(int(f.Fd()), make([]byte, 4096), 0); err != nil && !errors.Is(err, ErrClosed) {
				t.Errorf("write during Close: %v", err)
			}
		}()
	}
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wg.Wait() // newRing's cleanup closes it a third time
	if _, err := r.ReadAt(int(f.Fd()), make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Close: %v, want ErrClosed", err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestCheckProbe(t *testing.T) {
	reply := func(opsLen int, supported ...uint8) []byte {
		b := make([]byte, 16+64*8)
		b[1] = byte(opsLen)
		for _, op := range supported {
			b[16+int(op)*8] = op
			b[16+int(op)*8+2] = probeOpSupported
		}
		return b
	}
	for _, tc := range []struct {
		name string
		buf  []byte
		ok   bool
	}{
		{"both", reply(40, opRead, opWrite), true},
		{"no write", reply(40, opRead), false},
		{"ops list too short", reply(23, opRead, opWrite), false},
		{"truncated", reply(40, opRead, opWrite)[:16+22*8], false},
		{"empty", nil, false},
	} {
		if err := checkProbe(tc.buf, opRead, opWrite); (err == nil) != tc.ok {
			t.Errorf("%s: checkProbe = %v, want ok %v", tc.name, err, tc.ok)
		}
	}
}

func FuzzCheckProbe(f *testing.F) {
	f.Add(make([]byte, 16+64*8))
	f.Add([]byte{0, 40})
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := checkProbe(b, opRead, opWrite); err == nil {
			// Accepted only when both entries are really there.
			for _, op := range []int{opRead, opWrite} {
				at := 16 + op*8
				if at+8 > len(b) || int(b[at]) != op || b[at+2]&probeOpSupported == 0 {
					t.Fatalf("accepted a reply without operation %d", op)
				}
			}
		}
	})
}
