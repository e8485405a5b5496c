package ploop

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// interopCases are the geometries every interop test runs over. The 300 GiB
// image needs two BAT clusters at 1 MiB clusters; it stays sparse.
var interopCases = []struct {
	name          string
	size, cluster int64
	// full: small enough to convert to raw and compare every byte.
	full bool
}{
	{"7M-64K-partial-last-cluster", 7<<20 + 1536, 64 << 10, true},
	{"96M-1M", 96 << 20, 1 << 20, true},
	{"200M-4M", 200 << 20, 4 << 20, true},
	{"300G-1M-sparse", 300 << 30, 1 << 20, false},
}

// writeOp is one write of a random pattern.
type writeOp struct {
	off  int64
	data []byte
}

// randomOps makes writes that hit partial clusters, straddle cluster
// boundaries, cover whole clusters, rewrite earlier data, and land above
// 256 GiB on large images.
func randomOps(rng *rand.Rand, size, cluster int64, count int) []writeOp {
	var ops []writeOp
	add := func(off, n int64) {
		off = min(off, size-1)
		n = max(1, min(n, size-off))
		ops = append(ops, writeOp{off, randomBytes(rng, int(n))})
	}
	add(0, 1)                                  // first byte
	add(size-1, 1)                             // last byte
	add(cluster-100, 200)                      // straddles the first boundary
	add(2*cluster, cluster)                    // one whole cluster
	add(size/2+cluster/3, cluster+cluster/2)   // partial, whole-ish, partial
	add(size-cluster-cluster/2, cluster+4096)  // near the end
	add(min(size-1, 257<<30)+12345, 3*(1<<20)) // above 256 GiB when there
	for range count {
		// Cluster-local offsets keep the writes dense enough to collide.
		c := rng.Int64N(min(size/cluster+1, 64))
		if rng.IntN(3) == 0 {
			c = rng.Int64N(size/cluster + 1)
		}
		add(c*cluster+rng.Int64N(cluster), rng.Int64N(2*cluster)+1)
	}
	return ops
}

// applyOps writes ops to img and to a sparse raw model file.
func applyOps(t *testing.T, img interface {
	WriteAt([]byte, int64) (int, error)
}, model *os.File, ops []writeOp) {
	t.Helper()
	for _, op := range ops {
		if _, err := img.WriteAt(op.data, op.off); err != nil {
			t.Fatalf("write %d bytes at %d: %v", len(op.data), op.off, err)
		}
		if _, err := model.WriteAt(op.data, op.off); err != nil {
			t.Fatal(err)
		}
	}
}

func newModel(t *testing.T, size int64) (*os.File, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "model.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, p
}

// qemuCompare asserts that qemu reads the image as the same bytes as the
// raw file.
func qemuCompare(t *testing.T, image, rawFile string) {
	t.Helper()
	out, code := testcmd.Status(t, "qemu-img", "compare", "-f", "parallels", "-F", "raw", image, rawFile)
	if code != 0 {
		t.Fatalf("qemu-img compare %s %s: exit %d: %s", image, rawFile, code, out)
	}
}

// compareRanges asserts that img reads the same bytes as the model at every
// op's range and a little around it.
func compareRanges(t *testing.T, img interface {
	ReadAt([]byte, int64) (int, error)
	Size() int64
}, model *os.File, ops []writeOp) {
	t.Helper()
	for _, op := range ops {
		off := max(0, op.off-4096)
		end := min(img.Size(), op.off+int64(len(op.data))+4096)
		got := make([]byte, end-off)
		want := make([]byte, end-off)
		if _, err := img.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if _, err := model.ReadAt(want, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("range [%d,%d): %s", off, end, firstDiff(got, want))
		}
	}
}

// TestInteropOursReadByQemu: images written by pkg/ploop pass qemu-img
// check and read back through qemu as the raw model.
func TestInteropOursReadByQemu(t *testing.T) {
	for i, c := range interopCases {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			img, p := mustCreate(t, c.size, c.cluster)
			model, modelPath := newModel(t, img.Size())
			ops := randomOps(rng, img.Size(), c.cluster, 60)
			applyOps(t, img, model, ops[:len(ops)/2])
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			applyOps(t, img, model, ops[len(ops)/2:])
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, p)
			qemuCompare(t, p, modelPath)
			if c.full {
				want, _ := os.ReadFile(modelPath)
				if got := qemuToRaw(t, p); !bytes.Equal(got, want) {
					t.Fatalf("qemu-img convert -O raw differs from the model: %s", firstDiff(got, want))
				}
			}
			// Reopen for writing: allocation continues after the data.
			img = mustOpen(t, p, OpenOptions{})
			more := randomOps(rng, img.Size(), c.cluster, 10)
			applyOps(t, img, model, more)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, p)
			qemuCompare(t, p, modelPath)
		})
	}
}

// TestInteropQemuReadByOurs: images written by qemu-img convert and by
// qemu-io read back identically through pkg/ploop; writes by pkg/ploop on
// top of them read back through qemu.
func TestInteropQemuReadByOurs(t *testing.T) {
	for i, c := range interopCases {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(i), 11))
			dir := t.TempDir()
			model, modelPath := newModel(t, c.size)
			ops := randomOps(rng, c.size, c.cluster, 30)
			for _, op := range ops {
				model.WriteAt(op.data, op.off)
			}
			// Leave an all-zero cluster written explicitly in the source:
			// qemu-img convert must not allocate it, and reads are zeros.
			model.WriteAt(make([]byte, c.cluster), 5*c.cluster)
			converted := filepath.Join(dir, "convert.hdd")
			testcmd.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "parallels", "-o", "cluster_size="+strconv.FormatInt(c.cluster, 10), modelPath, converted)
			img := mustOpen(t, converted, OpenOptions{ReadOnly: true})
			if img.Size() != c.size || img.ClusterSize() != c.cluster {
				t.Fatalf("size %d cluster %d", img.Size(), img.ClusterSize())
			}
			compareRanges(t, img, model, ops)
			if c.full {
				want, _ := os.ReadFile(modelPath)
				if got := readAll(t, img); !bytes.Equal(got, want) {
					t.Fatalf("converted image: %s", firstDiff(got, want))
				}
			}
			img.Close()

			// qemu-io writes patterns into a qemu-img created image.
			written := filepath.Join(dir, "qemuio.hdd")
			testcmd.Run(t, "qemu-img", "create", "-q", "-f", "parallels", "-o", "cluster_size="+strconv.FormatInt(c.cluster, 10), written, strconv.FormatInt(c.size, 10))
			patModel, patModelPath := newModel(t, c.size)
			var args []string
			var pats []writeOp
			for k, op := range ops[:min(len(ops), 16)] {
				// qemu-io needs sector-aligned requests.
				off := op.off &^ 511
				n := min(max(int64(len(op.data))&^511, 512), c.size-off)
				pat := byte(0x11 + k)
				args = append(args, "-c", fmt.Sprintf("write -P %d %d %d", pat, off, n))
				w := writeOp{off, bytes.Repeat([]byte{pat}, int(n))}
				pats = append(pats, w)
				patModel.WriteAt(w.data, w.off)
			}
			testcmd.Run(t, "qemu-io", append([]string{"-f", "parallels"}, append(args, written)...)...)
			img = mustOpen(t, written, OpenOptions{})
			compareRanges(t, img, patModel, pats)
			if c.full {
				want, _ := os.ReadFile(patModelPath)
				if got := readAll(t, img); !bytes.Equal(got, want) {
					t.Fatalf("qemu-io image: %s", firstDiff(got, want))
				}
			}
			// Our writes on top of qemu's, then qemu reads both.
			applyOps(t, img, patModel, randomOps(rng, c.size, c.cluster, 10))
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, written)
			qemuCompare(t, written, patModelPath)
		})
	}
}

// makeV1Image writes a version 1 ("WithoutFreeSpace") image by hand: the
// BAT holds sector offsets. Clusters are stored in reverse order to make
// sure offsets, not positions, are followed.
func makeV1Image(t *testing.T, path string, size, cluster int64, data map[int64][]byte) {
	t.Helper()
	tracks := uint32(cluster / SectorSize)
	entries := uint32((size + cluster - 1) / cluster)
	hdr := Header{
		Version: 1, Heads: 16, Cylinders: uint32(size / 512 / 16 / 32), Tracks: tracks,
		BATEntries: entries, Sectors: uint64(size / SectorSize), DataOff: tracks,
	}
	batBytes := HeaderSize + 4*int64(entries)
	if batBytes > cluster {
		t.Fatalf("test image too large for one BAT cluster")
	}
	buf := make([]byte, cluster)
	hdr.put(buf)
	var order []int64
	for c := range data {
		order = append(order, c)
	}
	// Descending cluster order.
	for i := range order {
		for j := i + 1; j < len(order); j++ {
			if order[j] > order[i] {
				order[i], order[j] = order[j], order[i]
			}
		}
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for k, c := range order {
		host := cluster * int64(k+1)
		binary.LittleEndian.PutUint32(buf[HeaderSize+4*c:], uint32(host/SectorSize))
		if _, err := f.WriteAt(data[c], host); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
}

func TestVersion1Image(t *testing.T) {
	const cluster = 1 << 20
	const size = 16 << 20
	rng := rand.New(rand.NewPCG(3, 4))
	want := make([]byte, size)
	data := map[int64][]byte{}
	for _, c := range []int64{0, 3, 4, 15} {
		data[c] = randomBytes(rng, cluster)
		copy(want[c*cluster:], data[c])
	}
	p := filepath.Join(t.TempDir(), "v1.hdd")
	makeV1Image(t, p, size, cluster, data)
	// qemu agrees on what the hand-made image holds.
	if got := qemuToRaw(t, p); !bytes.Equal(got, want) {
		t.Fatalf("qemu reads the v1 image differently: %s", firstDiff(got, want))
	}
	img := mustOpen(t, p, OpenOptions{ReadOnly: true})
	if h := img.Header(); h.Version != 1 {
		t.Fatalf("version %d", h.Version)
	}
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatalf("v1 read: %s", firstDiff(got, want))
	}
	img.Close()
	rep, err := Check(p)
	if err != nil || len(rep.Problems) != 0 {
		t.Fatalf("check v1: %v\n%s", err, rep)
	}
	// Writing keeps it a v1 image with sector offsets that qemu follows.
	img = mustOpen(t, p, OpenOptions{})
	patch := randomBytes(rng, 3*cluster/2)
	if _, err := img.WriteAt(patch, 7*cluster+cluster/2); err != nil {
		t.Fatal(err)
	}
	copy(want[7*cluster+cluster/2:], patch)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(p)
	if string(raw[:16]) != sigV1 {
		t.Fatalf("signature changed to %q", raw[:16])
	}
	if got := qemuToRaw(t, p); !bytes.Equal(got, want) {
		t.Fatalf("qemu reads our v1 writes differently: %s", firstDiff(got, want))
	}
	qemuCheck(t, p)
}
