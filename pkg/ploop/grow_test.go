package ploop

import (
	"bytes"
	"errors"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestImageGrow(t *testing.T) {
	img, path := mustCreate(t, 1<<20+512, stackCluster)
	rng := rand.New(rand.NewPCG(21, 22))
	p := randomBytes(rng, 1<<20+512)
	img.WriteAt(p, 0)
	if err := img.Grow(3 << 20); err != nil {
		t.Fatal(err)
	}
	if img.Size() != 3<<20 {
		t.Fatalf("size %d", img.Size())
	}
	want := make([]byte, 3<<20)
	copy(want, p)
	q := randomBytes(rng, 5000)
	img.WriteAt(q, 2<<20)
	copy(want[2<<20:], q)
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatalf("grown image: %s", firstDiff(got, want))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	if got := qemuToRaw(t, path); !bytes.Equal(got, want) {
		t.Fatalf("qemu reads the grown image: %s", firstDiff(got, want))
	}
	img = mustOpen(t, path, OpenOptions{})
	defer img.Close()
	if err := img.Grow(1 << 20); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("shrink: %v", err)
	}
	// One 32 KiB BAT cluster holds 8176 entries: 255.5 MiB.
	if err := img.Grow(8176 * stackCluster); err != nil {
		t.Fatalf("grow to the end of the BAT area: %v", err)
	}
	// Past it the first data clusters move out of the way of the BAT.
	if err := img.Grow(600 << 20); err != nil {
		t.Fatalf("grow past the BAT area: %v", err)
	}
	if h := img.Header(); h.DataOff != 3*stackCluster/SectorSize {
		t.Fatalf("data_off %d sectors after the relocating grow", h.DataOff)
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after the relocating grow: %v %s", err, firstDiff(got, want))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	img = mustOpen(t, path, OpenOptions{ReadOnly: true})
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("reopened after the relocating grow: %v %s", err, firstDiff(got, want))
	}
}

func TestGrowStack(t *testing.T) {
	for _, raw := range []bool{false, true} {
		t.Run(map[bool]string{false: "ploop-base", true: "raw-base"}[raw], func(t *testing.T) {
			root := t.TempDir()
			dir := filepath.Join(root, "vol")
			mustInit(t, dir, raw)
			rng := rand.New(rand.NewPCG(23, 24))
			model := randomBytes(rng, stackSize)
			writeStack(t, dir, func(s *Stack) { s.WriteAt(model, 0) })
			// A raw top grows by truncation.
			if err := GrowStack(dir, stackSize+100<<10); err != nil {
				t.Fatal(err)
			}
			model = append(model, make([]byte, 100<<10)...)
			g, err := Snapshot(dir)
			if err != nil {
				t.Fatal(err)
			}
			frozen := bytes.Clone(model)
			if err := GrowStack(dir, 4<<20); err != nil {
				t.Fatal(err)
			}
			model = append(model, make([]byte, 4<<20-len(model))...)
			writeStack(t, dir, func(s *Stack) {
				if s.Size() != 4<<20 {
					t.Fatalf("stack size %d", s.Size())
				}
				// Across the old end, inside its short last cluster.
				p := randomBytes(rng, 3*stackCluster)
				s.WriteAt(p, int64(len(frozen))-1000)
				copy(model[len(frozen)-1000:], p)
			})
			if got := readStack(t, dir, ""); !bytes.Equal(got, model) {
				t.Fatalf("grown stack: %s", firstDiff(got, model))
			}
			if got := readStack(t, dir, g); !bytes.Equal(got, frozen) {
				t.Fatalf("snapshot of the smaller size: %s", firstDiff(got, frozen))
			}
			// A clone of the snapshot has the snapshot's size.
			if err := Clone(dir, g, filepath.Join(root, "clone")); err != nil {
				t.Fatal(err)
			}
			if got := readStack(t, filepath.Join(root, "clone"), ""); !bytes.Equal(got, frozen) {
				t.Fatalf("clone: %s", firstDiff(got, frozen))
			}
			// Merging the smaller snapshot into the grown top.
			if err := DeleteSnapshot(dir, g); err != nil {
				t.Fatal(err)
			}
			if got := readStack(t, dir, ""); !bytes.Equal(got, model) {
				t.Fatalf("after merging the smaller snapshot: %s", firstDiff(got, model))
			}
			list, _ := ListSnapshots(dir)
			qemuCheck(t, filepath.Join(dir, list[len(list)-1].File))
			if out := testcmd.Run(t, "qemu-img", "info", "-f", "parallels", filepath.Join(dir, list[len(list)-1].File)); !strings.Contains(out, "4 MiB") {
				t.Fatalf("qemu-img info of the grown top:\n%s", out)
			}
			if err := GrowStack(dir, 1<<20); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("shrink: %v", err)
			}
			// Past the first BAT cluster (8176 entries): relocation.
			if err := GrowStack(dir, 300<<20); err != nil {
				t.Fatalf("grow past the BAT area: %v", err)
			}
			model = append(model, make([]byte, 300<<20-len(model))...)
			if got := readStack(t, dir, ""); !bytes.Equal(got, model) {
				t.Fatalf("after the relocating grow: %s", firstDiff(got, model))
			}
			qemuCheck(t, filepath.Join(dir, list[len(list)-1].File))
		})
	}
}

// TestMergeAboveSmallerDelta is a case the model test found: merging a
// delta that lacks the old last cluster into a grown delta must not copy
// zeros over the data a smaller delta below holds there.
func TestMergeAboveSmallerDelta(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	want := make([]byte, 3<<20)
	want[2<<20] = 0x3a
	writeStack(t, dir, func(s *Stack) { s.WriteAt([]byte{0x3a}, 2<<20) })
	if _, err := Snapshot(dir); err != nil {
		t.Fatal(err)
	}
	mid, err := Snapshot(dir) // an empty delta of the old size
	if err != nil {
		t.Fatal(err)
	}
	if err := GrowStack(dir, 3<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := Snapshot(dir); err != nil {
		t.Fatal(err)
	}
	if err := DeleteSnapshot(dir, mid); err != nil {
		t.Fatal(err)
	}
	if got := readStack(t, dir, ""); !bytes.Equal(got, want) {
		t.Fatalf("after the merge: %s", firstDiff(got, want))
	}
	s := mustOpenStack(t, dir, StackOptions{ReadOnly: true})
	defer s.Close()
	if n, alloc, err := s.Extent(2<<20+stackCluster, 3<<20-(2<<20+stackCluster)); err != nil || alloc || n != 3<<20-(2<<20+stackCluster) {
		t.Fatalf("extent past the smaller deltas: %d %v %v", n, alloc, err)
	}
}
