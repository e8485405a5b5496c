package ploop

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	stackCluster = 32 << 10
	// stackSize is not a multiple of the cluster, to cover the short last
	// cluster.
	stackSize = 2<<20 + 3*512
)

func mustInit(t testing.TB, dir string, raw bool) {
	t.Helper()
	if err := InitStack(dir, InitOptions{Size: stackSize, ClusterSize: stackCluster, RawBase: raw}); err != nil {
		t.Fatal(err)
	}
}

func mustOpenStack(t testing.TB, dir string, opts StackOptions) *Stack {
	t.Helper()
	s, err := OpenStack(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// writeStack applies fn to the stack in dir opened for writing.
func writeStack(t testing.TB, dir string, fn func(s *Stack)) {
	t.Helper()
	s := mustOpenStack(t, dir, StackOptions{})
	fn(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// readStack returns the whole disk of dir, or of snapshot guid.
func readStack(t testing.TB, dir, guid string) []byte {
	t.Helper()
	s := mustOpenStack(t, dir, StackOptions{ReadOnly: true, Snapshot: guid})
	defer s.Close()
	return readAll(t, s)
}

func TestStackCopyUpAndDiscard(t *testing.T) {
	for _, raw := range []bool{false, true} {
		t.Run(map[bool]string{false: "ploop-base", true: "raw-base"}[raw], func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "vol")
			mustInit(t, dir, raw)
			rng := rand.New(rand.NewPCG(1, 2))
			base := randomBytes(rng, stackSize)
			writeStack(t, dir, func(s *Stack) {
				if _, err := s.WriteAt(base, 0); err != nil {
					t.Fatal(err)
				}
			})
			snap, err := Snapshot(dir)
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(base)
			writeStack(t, dir, func(s *Stack) {
				// A partial write inside a cluster only the base has:
				// the rest of the cluster must be copied up.
				p := randomBytes(rng, 100)
				s.WriteAt(p, stackCluster+10)
				copy(model[stackCluster+10:], p)
				// A partial discard and a whole-cluster discard over
				// lower data must read zeros, not the base.
				if err := s.Discard(3*stackCluster+7, 500); err != nil {
					t.Fatal(err)
				}
				clear(model[3*stackCluster+7 : 3*stackCluster+507])
				if err := s.Discard(5*stackCluster, 2*stackCluster); err != nil {
					t.Fatal(err)
				}
				clear(model[5*stackCluster : 7*stackCluster])
				if err := s.WriteZeroes(9*stackCluster, stackCluster, false); err != nil {
					t.Fatal(err)
				}
				clear(model[9*stackCluster : 10*stackCluster])
				// The short last cluster.
				p = randomBytes(rng, 700)
				s.WriteAt(p, stackSize-700)
				copy(model[stackSize-700:], p)
				for off := int64(0); off < stackSize; {
					n, alloc, err := s.Extent(off, stackSize-off)
					if err != nil || !alloc || n <= 0 {
						t.Fatalf("extent at %d of a fully written stack: %d %v %v", off, n, alloc, err)
					}
					off += n
				}
			})
			if got := readStack(t, dir, ""); !bytes.Equal(got, model) {
				t.Fatalf("volume: %s", firstDiff(got, model))
			}
			if got := readStack(t, dir, snap); !bytes.Equal(got, base) {
				t.Fatalf("snapshot changed: %s", firstDiff(got, base))
			}
			// The top holds only what was written: 5 clusters.
			list, err := ListSnapshots(dir)
			if err != nil {
				t.Fatal(err)
			}
			top := list[len(list)-1]
			info, err := Inspect(filepath.Join(dir, top.File))
			if err != nil {
				t.Fatal(err)
			}
			if info.AllocatedClusters != 6 {
				t.Fatalf("top has %d clusters, want 6", info.AllocatedClusters)
			}
			qemuCheck(t, filepath.Join(dir, top.File))
		})
	}
}

func TestStackLockAndReadOnly(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	s := mustOpenStack(t, dir, StackOptions{})
	defer s.Close()
	if _, err := OpenStack(dir, StackOptions{}); !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Fatalf("second writer: %v", err)
	}
	if _, err := Snapshot(dir); !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Fatalf("snapshot of a stack in use: %v", err)
	}
	ro := mustOpenStack(t, dir, StackOptions{ReadOnly: true})
	defer ro.Close()
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, unix.EPERM) {
		t.Fatalf("write to a read-only stack: %v", err)
	}
}

func TestInitRefusesNonEmpty(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x"), nil, 0o600)
	if err := InitStack(dir, InitOptions{Size: 1 << 20}); !errors.Is(err, os.ErrExist) {
		t.Fatalf("init of a non-empty directory: %v", err)
	}
	if err := InitStack(filepath.Join(dir, "v"), InitOptions{Size: 0}); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("init of size 0: %v", err)
	}
}

func TestChainLimit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	var guids []string
	for i := 1; i < MaxChain; i++ {
		g, err := Snapshot(dir)
		if err != nil {
			t.Fatalf("snapshot %d: %v", i, err)
		}
		guids = append(guids, g)
	}
	if _, err := Snapshot(dir); !errors.Is(err, ErrChainFull) {
		t.Fatalf("snapshot %d: %v", MaxChain, err)
	}
	s := mustOpenStack(t, dir, StackOptions{})
	if s.Depth() != MaxChain {
		t.Fatalf("depth %d", s.Depth())
	}
	s.WriteAt([]byte("deep"), 12345)
	s.Close()
	if err := DeleteSnapshot(dir, guids[50]); err != nil {
		t.Fatal(err)
	}
	if _, err := Snapshot(dir); err != nil {
		t.Fatalf("snapshot after a delete: %v", err)
	}
	if got := readStack(t, dir, ""); string(got[12345:12349]) != "deep" {
		t.Fatal("data lost")
	}
}

func TestDeleteSnapshotErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	if err := DeleteSnapshot(dir, TopGUID); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("delete the top: %v", err)
	}
	if err := DeleteSnapshot(dir, NewGUID()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("delete an unknown snapshot: %v", err)
	}
	if err := Clone(dir, TopGUID, filepath.Join(t.TempDir(), "c")); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("clone the top: %v", err)
	}
}

// TestCloneOutlivesSource deletes the source directory entirely: the clone
// keeps working because its lower deltas are hard links.
func TestCloneOutlivesSource(t *testing.T) {
	root := t.TempDir()
	src, dst := filepath.Join(root, "src"), filepath.Join(root, "dst")
	mustInit(t, src, true)
	rng := rand.New(rand.NewPCG(3, 4))
	data := randomBytes(rng, stackSize)
	writeStack(t, src, func(s *Stack) { s.WriteAt(data, 0) })
	g, err := Snapshot(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := Clone(src, g, dst); err != nil {
		t.Fatal(err)
	}
	list, _ := ListSnapshots(dst)
	if len(list) != 2 || list[0].Links != 2 || list[1].Links != 1 {
		t.Fatalf("clone deltas %+v", list)
	}
	// A snapshot of the clone's own is kept by flatten.
	writeStack(t, dst, func(s *Stack) { s.WriteAt([]byte("own"), 0) })
	copy(data, "own")
	own, err := Snapshot(dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := Flatten(dst); err != nil {
		t.Fatal(err)
	}
	list, _ = ListSnapshots(dst)
	if len(list) != 2 || list[0].GUID != own || list[0].Type != TypeCompressed || list[0].Links != 1 {
		t.Fatalf("flattened %+v", list)
	}
	if err := os.RemoveAll(src); err != nil {
		t.Fatal(err)
	}
	if got := readStack(t, dst, ""); !bytes.Equal(got, data) {
		t.Fatalf("clone after flatten and removal of the source: %s", firstDiff(got, data))
	}
	if got := readStack(t, dst, own); !bytes.Equal(got, data) {
		t.Fatalf("the clone's own snapshot after flatten: %s", firstDiff(got, data))
	}
	qemuCheck(t, filepath.Join(dst, list[0].File))
	// Sharing nothing, a second flatten changes nothing.
	if err := Flatten(dst); err != nil {
		t.Fatal(err)
	}
	if l2, _ := ListSnapshots(dst); len(l2) != 2 {
		t.Fatalf("second flatten: %+v", l2)
	}
	rep, err := CheckStack(dst)
	if err != nil || !rep.Clean() {
		t.Fatalf("check: %v %v", err, rep)
	}
}

func TestRepairStackRemovesOrphans(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	os.WriteFile(filepath.Join(dir, baseFile+".deadbeef"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(dir, DescriptorName+".tmp"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(dir, "user-file"), []byte("x"), 0o600)
	rep, err := CheckStack(dir)
	if err != nil || rep.Clean() || len(rep.Orphans) != 2 {
		t.Fatalf("check: %v %+v", err, rep)
	}
	if rep, err = RepairStack(dir); err != nil || !rep.Clean() {
		t.Fatalf("repair: %v %+v", err, rep)
	}
	if _, err := os.Stat(filepath.Join(dir, "user-file")); err != nil {
		t.Fatal("repair removed a file that is not ours")
	}
	if rep, err = CheckStack(dir); err != nil || !rep.Clean() || len(rep.Orphans) != 0 {
		t.Fatalf("check after repair: %v %+v", err, rep)
	}
}

// TestStackConcurrentCopyUp has goroutines write disjoint sectors of the
// same clusters, all held only by the lower delta: a copy-up racing with
// another write to its cluster would lose that write.
func TestStackConcurrentCopyUp(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	rng := rand.New(rand.NewPCG(7, 8))
	model := randomBytes(rng, stackSize)
	writeStack(t, dir, func(s *Stack) { s.WriteAt(model, 0) })
	if _, err := Snapshot(dir); err != nil {
		t.Fatal(err)
	}
	const workers = 8
	s := mustOpenStack(t, dir, StackOptions{})
	sectors := int64(stackSize / SectorSize)
	errs := make(chan error, workers)
	for w := range int64(workers) {
		p := bytes.Repeat([]byte{byte(w + 1)}, SectorSize)
		go func() {
			for sec := w; sec < sectors; sec += workers {
				var err error
				if sec%(3*workers) == w {
					err = s.WriteZeroes(sec*SectorSize, SectorSize, false)
				} else {
					_, err = s.WriteAt(p, sec*SectorSize)
				}
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range workers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for sec := range sectors {
		w := sec % workers
		want := bytes.Repeat([]byte{byte(w + 1)}, SectorSize)
		if sec%(3*workers) == w {
			want = make([]byte, SectorSize)
		}
		copy(model[sec*SectorSize:], want)
	}
	if got := readStack(t, dir, ""); !bytes.Equal(got, model) {
		t.Fatalf("concurrent writes: %s", firstDiff(got, model))
	}
}

func TestStackDirect(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	rng := rand.New(rand.NewPCG(11, 12))
	model := make([]byte, stackSize)
	p := randomBytes(rng, 3*stackCluster)
	copy(model[1000:], p)
	writeStack(t, dir, func(s *Stack) { s.WriteAt(p, 1000) })
	g, err := Snapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := mustOpenStack(t, dir, StackOptions{Direct: true})
	q := randomBytes(rng, 777)
	if _, err := s.WriteAt(q, stackCluster+5); err != nil {
		t.Fatal(err)
	}
	copy(model[stackCluster+5:], q)
	if got := readAll(t, s); !bytes.Equal(got, model) {
		t.Fatalf("direct stack: %s", firstDiff(got, model))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readStack(t, dir, g); !bytes.Equal(got[1000:1000+len(p)], p) {
		t.Fatal("snapshot changed")
	}
}

// TestOpenVZStyleStack builds a stack the way OpenVZ lays one out, with
// images made and written by qemu-img/qemu-io and a descriptor carrying
// OpenVZ's extra elements, and reads it through OpenStack.
func TestOpenVZStyleStack(t *testing.T) {
	dir := t.TempDir()
	const size = 4 << 20
	base := filepath.Join(dir, "root.hds")
	delta := filepath.Join(dir, "root.hds.{9a1f0c3e-1111-4c2b-8d7e-5d2e0a0e2a12}")
	for _, p := range []string{base, delta} {
		testcmd.Run(t, "qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size=1M", p, fmt.Sprint(size))
	}
	// The base has 0xaa in its first 2 MiB; the delta overwrites 4 KiB
	// inside the second cluster and writes a third.
	testcmd.Run(t, "qemu-io", "-f", "parallels", "-c", "write -P 0xaa 0 2M", base)
	testcmd.Run(t, "qemu-io", "-f", "parallels", "-c", "write -P 0xbb 1M 4k", "-c", "write -P 0xcc 3M 1M", delta)
	d := strings.NewReplacer("20971520", fmt.Sprint(size/512), "20805", fmt.Sprint(size/512/16/63)).Replace(openvzDescriptor)
	if err := os.WriteFile(filepath.Join(dir, DescriptorName), []byte(d), 0o600); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for i := range 2 << 20 {
		want[i] = 0xaa
	}
	for i := 1 << 20; i < 1<<20+4096; i++ {
		want[i] = 0xbb
	}
	for i := 3 << 20; i < 4<<20; i++ {
		want[i] = 0xcc
	}
	// qemu-io wrote only 4 KiB of the delta's second cluster: the rest of
	// that cluster reads as the delta's zeros, as in OpenVZ (ploop deltas
	// are written by whole-cluster copy-up, so a real delta never has a
	// partial cluster over lower data).
	clear(want[1<<20+4096 : 2<<20])
	s := mustOpenStack(t, dir, StackOptions{})
	if got := readAll(t, s); !bytes.Equal(got, want) {
		t.Fatalf("OpenVZ-style stack: %s", firstDiff(got, want))
	}
	// A write through the stack into the base-only first cluster copies
	// it up.
	s.WriteAt([]byte{1, 2, 3}, 100)
	copy(want[100:], []byte{1, 2, 3})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readStack(t, dir, ""); !bytes.Equal(got, want) {
		t.Fatalf("after copy-up: %s", firstDiff(got, want))
	}
	qemuCheck(t, delta)
	if got := qemuToRaw(t, delta)[:1<<20]; !bytes.Equal(got, want[:1<<20]) {
		t.Fatalf("the copied-up cluster as qemu reads the delta: %s", firstDiff(got, want[:1<<20]))
	}
	// The descriptor's extra elements survive a snapshot.
	if _, err := Snapshot(dir); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, DescriptorName))
	if !strings.Contains(string(b), "<Encryption>") {
		t.Fatalf("snapshot dropped OpenVZ elements:\n%s", b)
	}
}
