package ploop

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// fileUsage returns a file's length and the bytes the filesystem has
// allocated for it.
func fileUsage(t testing.TB, path string) (int64, int64) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size(), st.Sys().(*syscall.Stat_t).Blocks * 512
}

// TestCompactReclaimsDiscardedHalf fills an image, discards every other
// cluster (half the data) and zeroes a few more while keeping them
// allocated, then compacts: the contents stay, qemu-img agrees the image is
// clean, and the file shrinks by about half.
func TestCompactReclaimsDiscardedHalf(t *testing.T) {
	const clusters = 256
	img, path := mustCreate(t, clusters*stackCluster, stackCluster)
	rng := rand.New(rand.NewPCG(31, 32))
	want := randomBytes(rng, clusters*stackCluster)
	if _, err := img.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	for c := int64(0); c < clusters; c += 2 {
		if err := img.Discard(c*stackCluster, stackCluster); err != nil {
			t.Fatal(err)
		}
		clear(want[c*stackCluster : (c+1)*stackCluster])
	}
	// Allocated but all zero: compaction unallocates these too.
	for _, c := range []int64{1, 77, 201} {
		if err := img.WriteZeroes(c*stackCluster, stackCluster, true); err != nil {
			t.Fatal(err)
		}
		clear(want[c*stackCluster : (c+1)*stackCluster])
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	lenBefore, usedBefore := fileUsage(t, path)
	res, err := img.Compact()
	if err != nil {
		t.Fatal(err)
	}
	if res.ZeroClusters != 3 || res.FileSizeAfter != stackCluster+(clusters/2-3)*stackCluster {
		t.Fatalf("compact result %+v", res)
	}
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatalf("after compact: %s", firstDiff(got, want))
	}
	// Writing after compaction allocates past the new end.
	p := randomBytes(rng, 3*stackCluster)
	if _, err := img.WriteAt(p, 10*stackCluster+5); err != nil {
		t.Fatal(err)
	}
	copy(want[10*stackCluster+5:], p)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	if got := qemuToRaw(t, path); !bytes.Equal(got, want) {
		t.Fatalf("qemu reads the compacted image: %s", firstDiff(got, want))
	}
	lenAfter, usedAfter := fileUsage(t, path)
	written := int64(clusters * stackCluster)
	t.Logf("discarded half of %d KiB: file length %d -> %d KiB (%.1f%% of the data reclaimed), allocated %d -> %d KiB",
		written>>10, lenBefore>>10, lenAfter>>10, 100*float64(lenBefore-lenAfter)/float64(written), usedBefore>>10, usedAfter>>10)
	// Half the data was discarded: at least 45% of the file must go.
	if float64(lenBefore-lenAfter) < 0.45*float64(written) {
		t.Fatalf("compaction reclaimed only %d of %d bytes", lenBefore-lenAfter, written)
	}
}

// TestCompactStackKeepsMaskingZeros: in a stack, an all-zero top cluster
// over data in a lower delta must stay allocated (it hides that data); one
// over zeros may go.
func TestCompactStackKeepsMaskingZeros(t *testing.T) {
	for _, raw := range []bool{false, true} {
		t.Run(map[bool]string{false: "ploop-base", true: "raw-base"}[raw], func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "vol")
			mustInit(t, dir, raw)
			rng := rand.New(rand.NewPCG(33, 34))
			want := make([]byte, stackSize)
			base := randomBytes(rng, 16*stackCluster)
			writeStack(t, dir, func(s *Stack) { s.WriteAt(base, 0) })
			copy(want, base)
			if _, err := Snapshot(dir); err != nil {
				t.Fatal(err)
			}
			writeStack(t, dir, func(s *Stack) {
				top := randomBytes(rng, 40*stackCluster)
				s.WriteAt(top, 8*stackCluster)
				copy(want[8*stackCluster:], top)
				// Zeros over base data (kept) and over nothing (freed).
				for _, c := range []int64{3, 9, 30, 31} {
					s.WriteZeroes(c*stackCluster, stackCluster, true)
					clear(want[c*stackCluster : (c+1)*stackCluster])
				}
				// Holes in the middle of the top's clusters.
				for c := int64(20); c < 28; c++ {
					s.Discard(c*stackCluster, stackCluster)
					clear(want[c*stackCluster : (c+1)*stackCluster])
				}
			})
			res, err := CompactStack(dir)
			if err != nil {
				t.Fatal(err)
			}
			if res.ZeroClusters != 2 || res.KeptZeroClusters != 2 || res.MovedClusters == 0 {
				t.Fatalf("compact result %+v", res)
			}
			if got := readStack(t, dir, ""); !bytes.Equal(got, want) {
				t.Fatalf("after compact: %s", firstDiff(got, want))
			}
			rep, err := CheckStack(dir)
			if err != nil || !rep.Clean() {
				t.Fatalf("check: %v %v", err, rep)
			}
			list, _ := ListSnapshots(dir)
			qemuCheck(t, filepath.Join(dir, list[len(list)-1].File))
		})
	}
}

// TestCompactEmptyAndCompacted: compacting an empty or already compact
// image changes nothing.
func TestCompactEmptyAndCompacted(t *testing.T) {
	img, path := mustCreate(t, 1<<20, stackCluster)
	if res, err := img.Compact(); err != nil || res.MovedClusters != 0 || res.FileSizeAfter != stackCluster {
		t.Fatalf("empty: %+v %v", res, err)
	}
	img.WriteAt([]byte{1}, 5*stackCluster)
	for range 2 {
		if res, err := img.Compact(); err != nil || res.MovedClusters != 0 || res.FileSizeAfter != 2*stackCluster {
			t.Fatalf("compact: %+v %v", res, err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	ro := mustOpen(t, path, OpenOptions{ReadOnly: true})
	defer ro.Close()
	if _, err := ro.Compact(); err == nil {
		t.Fatal("compacted a read-only image")
	}
}

// qemuCheckTop runs qemu-img check on the top delta of the stack in dir
// (a raw top has nothing to check).
func qemuCheckTop(t testing.TB, dir string) {
	t.Helper()
	list, err := ListSnapshots(dir)
	if err != nil {
		t.Fatal(err)
	}
	if top := list[len(list)-1]; top.Type == TypeCompressed {
		qemuCheck(t, filepath.Join(dir, top.File))
	}
}

// prepareCompaction gives the top delta of dir work for a compaction
// without changing what the stack reads: a few of its clusters are
// discarded and written again with the same data (leaving holes below new
// clusters at the end), and all-zero clusters are allocated where the
// whole stack reads zeros.
func prepareCompaction(dir string) error {
	s, err := OpenStack(dir, StackOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	view := make([]byte, s.Size())
	_, err = s.ReadAt(view, 0)
	s.Close()
	if err != nil {
		return err
	}
	d, err := ReadDescriptor(dir)
	if err != nil {
		return err
	}
	chain := d.Chain()
	img, err := Open(filepath.Join(dir, chain[len(chain)-1].File), OpenOptions{})
	if err != nil {
		return err
	}
	cs := img.ClusterSize()
	moved, zeros := 0, 0
	for i := int64(0); i*cs < img.Size(); i++ {
		off := i * cs
		chunk := view[off:min(off+cs, img.Size())]
		switch {
		case img.lookup(i) != 0 && moved < 8 && i%2 == 0:
			// Move the cluster to the end: copy, switch the entry, free
			// the old place. The stack reads the same at every step, so
			// a kill during this preparation is harmless too.
			old := img.lookup(i)
			host, err := img.reserve()
			if err != nil {
				return err
			}
			if _, err := img.s.WriteAt(chunk, host); err != nil {
				return err
			}
			if err := img.publish(i, host); err != nil {
				return err
			}
			if err := img.Flush(); err != nil {
				return err
			}
			if err := img.s.PunchHole(old, cs); err != nil {
				return err
			}
			moved++
		case img.lookup(i) == 0 && allZero(chunk) && zeros < 6:
			if err := img.WriteZeroes(off, int64(len(chunk)), true); err != nil {
				return err
			}
			zeros++
		}
	}
	return img.Close()
}

// TestCompactFreesTailInSteps: the tail that compaction gives up is freed
// in steps of at most tailStep. The kernel holds the file's inode lock
// while it frees a range, and all writes to the file wait meanwhile: one
// ftruncate that freed 1 GiB stalled every writer for 16 s (make bench).
// The allocated bytes of the file are sampled at every punch and truncate;
// what disappears between two samples is what one call freed.
func TestCompactFreesTailInSteps(t *testing.T) {
	const cluster, moved = 1 << 20, 4 * tailStep
	dir := filepath.Join(t.TempDir(), "vol")
	if err := InitStack(dir, InitOptions{Size: 2 * moved, ClusterSize: cluster}); err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		armed   bool
		samples []int64 // allocated bytes of the top delta before each punch or truncate, and at the end
	)
	allocated := func(path string) int64 {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			t.Error(err)
		}
		return st.Blocks * 512
	}
	var top string
	s := mustOpenStack(t, dir, StackOptions{faults: func(op, path string) error {
		mu.Lock()
		defer mu.Unlock()
		if armed && (op == "punch" || op == "truncate") && strings.HasSuffix(path, ".hds") {
			top = path
			samples = append(samples, allocated(path))
		}
		return nil
	}})
	defer s.Close()
	// Allocated zeros first (unmapped by compaction), data after them
	// (moved down into their places), so the whole second half is cut.
	data := bytes.Repeat([]byte{0x5a}, moved)
	if _, err := s.WriteAt(make([]byte, moved), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteAt(data, moved); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	armed = true
	mu.Unlock()
	if _, _, err := s.Compact(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	armed = false
	samples = append(samples, allocated(top))
	mu.Unlock()
	var most int64
	for k := 1; k < len(samples); k++ {
		most = max(most, samples[k-1]-samples[k])
	}
	t.Logf("%d punch/truncate calls; the most one freed: %d KiB (of %d KiB moved)", len(samples)-1, most>>10, moved>>10)
	if most > tailStep {
		t.Fatalf("one call freed %d bytes at once, more than %d", most, tailStep)
	}
	if total := samples[0] - samples[len(samples)-1]; total < moved/2 {
		t.Fatalf("compaction freed only %d of %d bytes", total, moved)
	}
	got := make([]byte, moved)
	if _, err := s.ReadAt(got, moved); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the moved data reads back wrong (%v)", err)
	}
}
