package ploop

import (
	"bytes"
	"errors"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestCreateMatchesQemu compares the whole file Create writes with what
// qemu-img create -f parallels writes for the same size and cluster size.
func TestCreateMatchesQemu(t *testing.T) {
	cases := []struct {
		name          string
		size, cluster int64
	}{
		{"tiny-unaligned", 12345, 0},
		{"1e9-64K", 1_000_000_000, 64 << 10},
		{"10G-1M", 10 << 30, 1 << 20},
		{"300G-1M-two-BAT-clusters", 300 << 30, 1 << 20},
		{"1T-4M", 1 << 40, 4 << 20},
		{"1G-32K", 1 << 30, 32 << 10},
		{"64M-64M", 64 << 20, 64 << 20},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			ours := filepath.Join(dir, "ours.hdd")
			theirs := filepath.Join(dir, "qemu.hdd")
			img, err := Create(ours, CreateOptions{Size: c.size, ClusterSize: c.cluster})
			if err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			args := []string{"create", "-q", "-f", "parallels"}
			if c.cluster != 0 {
				args = append(args, "-o", "cluster_size="+itoa64(c.cluster))
			}
			testcmd.Run(t, "qemu-img", append(args, theirs, itoa64(c.size))...)
			a, _ := os.ReadFile(ours)
			b, _ := os.ReadFile(theirs)
			if !bytes.Equal(a, b) {
				t.Fatalf("Create differs from qemu-img create: %s\nours:   %x\nqemu's: %x", firstDiff(a, b), a[:64], b[:64])
			}
			qemuCheck(t, ours)
			// Only the header block holds data: the BAT area is a hole.
			if used := allocatedBytes(t, ours); used > 64<<10 {
				t.Fatalf("new image occupies %d bytes on disk; it should stay sparse", used)
			}
		})
	}
}

func TestCreateRejects(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []CreateOptions{
		{Size: 0},
		{Size: -1},
		{Size: 1 << 30, ClusterSize: 16 << 10},
		{Size: 1 << 30, ClusterSize: 128 << 20},
		{Size: 1 << 30, ClusterSize: 3 << 20},
		{Size: 1 << 62, ClusterSize: 32 << 10}, // needs more than 2^32 clusters
	} {
		if _, err := Create(filepath.Join(dir, "x"), c); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("Create(%+v) = %v, want EINVAL", c, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "x")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Create(%+v) left a file behind", c)
		}
	}
	img, p := mustCreate(t, 1<<20, 0)
	img.Close()
	if _, err := Create(p, CreateOptions{Size: 1 << 20}); !errors.Is(err, os.ErrExist) {
		t.Errorf("Create over an existing file: %v", err)
	}
}

func itoa64(i int64) string { return strconv.FormatInt(i, 10) }

// TestReadWriteModel writes random ranges through an image and a byte-slice
// model and compares them, before and after reopening.
func TestReadWriteModel(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			const size = 5<<20 + 3*512
			p := filepath.Join(t.TempDir(), "d.hdd")
			img, err := Create(p, CreateOptions{Size: size, ClusterSize: 64 << 10, Direct: direct})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			rng := rand.New(rand.NewPCG(1, 2))
			for range 300 {
				off := rng.Int64N(size)
				n := rng.Int64N(min(size-off, 200<<10)) + 1
				switch rng.IntN(10) {
				case 0:
					if err := img.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case 1:
					if err := img.WriteZeroes(off, n, rng.IntN(2) == 0); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				default:
					b := randomBytes(rng, int(n))
					if _, err := img.WriteAt(b, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], b)
				}
				if rng.IntN(20) == 0 {
					if err := img.Flush(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if got := readAll(t, img); !bytes.Equal(got, model) {
				t.Fatalf("before close: %s", firstDiff(got, model))
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			img = mustOpen(t, p, OpenOptions{ReadOnly: true, Direct: direct})
			defer img.Close()
			if got := readAll(t, img); !bytes.Equal(got, model) {
				t.Fatalf("after reopen: %s", firstDiff(got, model))
			}
			rep, err := Check(p)
			if err != nil || !rep.Clean() || len(rep.Problems) != 0 {
				t.Fatalf("check after close: %v\n%s", err, rep)
			}
		})
	}
}

func TestInUseMark(t *testing.T) {
	img, p := mustCreate(t, 4<<20, 0)
	if _, err := img.WriteAt([]byte("hello"), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(p)
	h, err := ParseHeader(raw)
	if err != nil || !h.InUseMarked() {
		t.Fatalf("in-use mark not set while open: %v %+v", err, h)
	}
	// A second writer is refused while the first holds the image.
	if _, err := Open(p, OpenOptions{}); !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Fatalf("second writer: %v", err)
	}
	if rep, err := Check(p); err != nil || rep.Clean() || !strings.Contains(rep.String(), "open for writing by another process") {
		t.Fatalf("check while open: %v\n%s", err, rep)
	}
	// Simulate a crash: drop the file without Close.
	img.s.Close()
	if _, err := Open(p, OpenOptions{}); !errors.Is(err, ErrInUse) {
		t.Fatalf("open of an unclean image for writing: %v", err)
	}
	ro := mustOpen(t, p, OpenOptions{ReadOnly: true})
	b := make([]byte, 5)
	if _, err := ro.ReadAt(b, 0); err != nil || string(b) != "hello" {
		t.Fatalf("read-only open of unclean image: %q %v", b, err)
	}
	ro.Close()
	rep, err := Repair(p)
	if err != nil || !rep.Clean() || !rep.Repaired {
		t.Fatalf("repair: %v\n%s", err, rep)
	}
	img = mustOpen(t, p, OpenOptions{})
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	raw, _ = os.ReadFile(p)
	if h, _ := ParseHeader(raw); h.InUse != 0 {
		t.Fatalf("in-use mark left after Close: %#x", h.InUse)
	}
}

func TestImageErrors(t *testing.T) {
	img, p := mustCreate(t, 1<<20, 0)
	if _, err := img.ReadAt(make([]byte, 2), 1<<20-1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("read past end: %v", err)
	}
	if _, err := img.WriteAt(make([]byte, 1), -1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("write at -1: %v", err)
	}
	if err := img.Discard(0, 1<<20+1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("discard past end: %v", err)
	}
	if _, _, err := img.Extent(1<<20, 1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("extent past end: %v", err)
	}
	img.Close()
	if err := img.Close(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("second close: %v", err)
	}
	ro := mustOpen(t, p, OpenOptions{ReadOnly: true})
	defer ro.Close()
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("write to read-only: %v", err)
	}
	if err := ro.WriteZeroes(0, 1, true); !errors.Is(err, syscall.EPERM) {
		t.Errorf("write zeroes to read-only: %v", err)
	}
	if err := ro.Discard(0, 1); !errors.Is(err, syscall.EPERM) {
		t.Errorf("discard on read-only: %v", err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "none"), OpenOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("open missing: %v", err)
	}
	junk := filepath.Join(t.TempDir(), "junk")
	os.WriteFile(junk, bytes.Repeat([]byte("x"), 4096), 0o600)
	if _, err := Open(junk, OpenOptions{}); !errors.Is(err, ErrNotPloop) {
		t.Errorf("open junk: %v", err)
	}
}

// TestENOSPC runs writes on a tiny filesystem-like limit: RLIMIT_FSIZE is
// not usable in tests, so a file-backed storage that fails writes beyond a
// limit is used to check that errors wrap the syscall error.
func TestWriteErrorWraps(t *testing.T) {
	img, _ := mustCreate(t, 8<<20, 64<<10)
	defer img.Close()
	img.s = &failingStorage{storage: img.s, err: syscall.ENOSPC}
	_, err := img.WriteAt(make([]byte, 4096), 1<<20)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write error: %v, want ENOSPC", err)
	}
	if n, alloc, _ := img.Extent(1<<20, 4096); alloc {
		t.Fatalf("failed write left cluster allocated (%d)", n)
	}
	img.s = img.s.(*failingStorage).storage
}

type failingStorage struct {
	storage
	err error
}

func (f *failingStorage) WriteAt(p []byte, off int64) (int, error) {
	return 0, &os.PathError{Op: "write", Path: "test", Err: f.err}
}

func TestExtentAndMap(t *testing.T) {
	const cs = 64 << 10
	img, _ := mustCreate(t, 10*cs+512, cs)
	defer img.Close()
	for _, c := range []int64{2, 3, 5, 10} {
		if _, err := img.WriteAt([]byte{1}, c*cs+7); err != nil {
			t.Fatal(err)
		}
	}
	type ext struct {
		n     int64
		alloc bool
	}
	var got []ext
	for off := int64(0); off < img.Size(); {
		n, a, err := img.Extent(off, img.Size()-off)
		if err != nil || n <= 0 {
			t.Fatalf("extent at %d: %d %v", off, n, err)
		}
		got = append(got, ext{n, a})
		off += n
	}
	want := []ext{{2 * cs, false}, {2 * cs, true}, {cs, false}, {cs, true}, {4 * cs, false}, {512, true}}
	if len(got) != len(want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("extents %v, want %v", got, want)
		}
	}
	if n, a, _ := img.Extent(2*cs+5, 10); n != 10 || !a {
		t.Fatalf("short extent: %d %v", n, a)
	}
	m := img.Map()
	// Clusters 2 and 3 were allocated one after the other, so they merge.
	if len(m) != 3 || m[0].Offset != 2*cs || m[0].Length != 2*cs || m[2].Offset != 10*cs || m[2].Length != 512 {
		t.Fatalf("map %+v", m)
	}
	if n := img.AllocatedClusters(); n != 4 {
		t.Fatalf("allocated %d", n)
	}
}

// TestConcurrent writes disjoint ranges (within shared clusters too) from
// many goroutines while others read, then checks every byte.
func TestConcurrent(t *testing.T) {
	const cs = 64 << 10
	const size = 64 * cs
	img, p := mustCreate(t, size, cs)
	const writers = 8
	var wg sync.WaitGroup
	errs := make(chan error, 2*writers)
	// Writer w owns bytes where (offset/4096)%writers == w: each cluster
	// is shared by all writers, so allocations race.
	for w := range writers {
		wg.Go(func() {
			for blk := w; blk < size/4096; blk += writers {
				if _, err := img.WriteAt(bytes.Repeat([]byte{byte(w + 1)}, 4096), int64(blk)*4096); err != nil {
					errs <- err
					return
				}
				if blk%(writers*16) == w {
					if err := img.Flush(); err != nil {
						errs <- err
						return
					}
				}
			}
		})
		wg.Go(func() {
			b := make([]byte, 8192)
			for i := range 200 {
				if _, err := img.ReadAt(b, int64(i*4096)%(size-8192)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img = mustOpen(t, p, OpenOptions{ReadOnly: true})
	defer img.Close()
	got := readAll(t, img)
	for blk := range size / 4096 {
		if !bytes.Equal(got[blk*4096:(blk+1)*4096], bytes.Repeat([]byte{byte(blk%writers + 1)}, 4096)) {
			t.Fatalf("block %d lost", blk)
		}
	}
	if n := img.AllocatedClusters(); n != size/cs {
		t.Fatalf("%d clusters allocated, want %d (a race allocated twice?)", n, size/cs)
	}
	qemuCheck(t, p)
}

func TestDiscardPunchesAndTrims(t *testing.T) {
	const cs = 1 << 20
	img, p := mustCreate(t, 8*cs, cs)
	if _, err := img.WriteAt(bytes.Repeat([]byte{7}, 3*cs), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Discard(cs/2, 2*cs+cs/2); err != nil { // partial 0, whole 1 and 2
		t.Fatal(err)
	}
	if n := img.AllocatedClusters(); n != 1 {
		t.Fatalf("%d allocated after discard", n)
	}
	got := make([]byte, 3*cs)
	img.ReadAt(got, 0)
	want := append(bytes.Repeat([]byte{7}, cs/2), make([]byte, 2*cs+cs/2)...)
	if !bytes.Equal(got, want) {
		t.Fatalf("discard: %s", firstDiff(got, want))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(p)
	if st.Size() != 2*cs { // header/BAT cluster + cluster 0: discarded tail trimmed
		t.Fatalf("file size %d after discarding the tail", st.Size())
	}
	qemuCheck(t, p)
}

// blockingStorage holds every data write until released, to show what
// does not wait for an in-flight write.
type blockingStorage struct {
	storage
	entered chan struct{}
	release chan struct{}
}

func (b *blockingStorage) WriteAt(p []byte, off int64) (int, error) {
	// Once released, writes (such as an allocation's BAT write-through)
	// pass without announcing themselves.
	select {
	case b.entered <- struct{}{}:
	case <-b.release:
	}
	<-b.release
	return b.storage.WriteAt(p, off)
}

// TestReadsNotBehindWrites: while a write that allocates one cluster and a
// write to an allocated cluster are both stuck in the storage layer, reads
// of other clusters (allocated or not) and Extent still complete.
func TestReadsNotBehindWrites(t *testing.T) {
	const cs = 64 << 10
	img, _ := mustCreate(t, 16*cs, cs)
	if _, err := img.WriteAt(bytes.Repeat([]byte{5}, cs), 3*cs); err != nil {
		t.Fatal(err)
	}
	bs := &blockingStorage{storage: img.s, entered: make(chan struct{}), release: make(chan struct{})}
	img.s = bs
	done := make(chan error, 2)
	go func() { _, err := img.WriteAt([]byte{1}, 7*cs); done <- err }() // allocates
	<-bs.entered
	go func() { _, err := img.WriteAt([]byte{2}, 3*cs+10); done <- err }() // rewrite
	<-bs.entered
	read := make(chan error, 1)
	go func() {
		b := make([]byte, 2*cs)
		if _, err := img.ReadAt(b, 2*cs); err != nil { // clusters 2 and 3
			read <- err
			return
		}
		if b[0] != 0 || b[cs] != 5 {
			read <- errors.New("wrong data")
			return
		}
		_, _, err := img.Extent(0, img.Size())
		read <- err
	}()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	select {
	case err := <-read:
		if err != nil {
			t.Fatal(err)
		}
	case <-timer.C:
		t.Fatal("read waited for writes to other clusters")
	}
	close(bs.release)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	img.s = bs.storage
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestLeakTrimmedOnClose: a leak does not block writing, and a clean Close
// leaves no leak behind.
func TestLeakTrimmedOnClose(t *testing.T) {
	img, p := mustCreate(t, 4<<20, 64<<10)
	img.WriteAt([]byte("x"), 0)
	img.Close()
	f, _ := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	f.Write(make([]byte, 100000))
	f.Close()
	img = mustOpen(t, p, OpenOptions{})
	if _, err := img.WriteAt([]byte("y"), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if rep, err := Check(p); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("after close: %v\n%s", err, rep)
	}
	qemuCheck(t, p)
}

// TestFormatExtensionDropped: opening for writing drops a format extension
// (its dirty bitmaps would go stale) instead of leaving it to be corrupted;
// read-only opens keep it.
func TestFormatExtensionDropped(t *testing.T) {
	const cs = 64 << 10
	img, p := mustCreate(t, 4<<20, cs)
	img.WriteAt([]byte("data"), 0)
	img.Close()
	size := fileSizeOf(t, p)
	f, _ := os.OpenFile(p, os.O_WRONLY, 0)
	f.WriteAt(bytes.Repeat([]byte{0xAB}, cs), size)
	f.Close()
	putLE32(t, p, 56, uint32(size/SectorSize))
	if rep, err := Check(p); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("image with an extension: %v\n%s", err, rep)
	}
	ro := mustOpen(t, p, OpenOptions{ReadOnly: true})
	ro.Close()
	if info, _ := Inspect(p); info.ExtensionOffset != size {
		t.Fatalf("read-only open changed the extension: %+v", info)
	}
	img = mustOpen(t, p, OpenOptions{})
	img.WriteAt([]byte("more"), 1<<20)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	info, err := Inspect(p)
	if err != nil || info.ExtensionOffset != 0 || info.Problems != 0 {
		t.Fatalf("after writing: %v %+v", err, info)
	}
	b := make([]byte, 4)
	img = mustOpen(t, p, OpenOptions{ReadOnly: true})
	defer img.Close()
	img.ReadAt(b, 1<<20)
	if string(b) != "more" {
		t.Fatalf("read %q", b)
	}
	qemuCheck(t, p)
}

// TestDiscardPartialLastCluster: a discard up to the end of the disk frees
// the last cluster even though the disk ends inside it.
func TestDiscardPartialLastCluster(t *testing.T) {
	const cs = 64 << 10
	img, _ := mustCreate(t, 3*cs+4096, cs)
	defer img.Close()
	if _, err := img.WriteAt(bytes.Repeat([]byte{9}, 4096), 3*cs); err != nil {
		t.Fatal(err)
	}
	if err := img.Discard(3*cs, 4096); err != nil {
		t.Fatal(err)
	}
	if n := img.AllocatedClusters(); n != 0 {
		t.Fatalf("%d clusters still allocated", n)
	}
}
