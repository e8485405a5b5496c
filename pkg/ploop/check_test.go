package ploop

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func putLE32(t *testing.T, path string, off int64, v uint32) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := binary.LittleEndian.AppendUint32(nil, v)
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func getLE32(t *testing.T, path string, off int64) uint32 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 4)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint32(b)
}

func fileSizeOf(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func batOff(i int64) int64 { return HeaderSize + 4*i }

// TestRepair corrupts a written image in each way Check knows, and checks
// that Check reports it, Repair fixes it, the data that can be kept is
// kept, and qemu-img check then agrees the image is clean.
func TestRepair(t *testing.T) {
	const cs = 64 << 10
	const clusters = 10
	cases := []struct {
		name string
		// size and cluster of the image; 0 = 2 MiB and cs.
		size int64
		// corrupt damages the closed image and adjusts want (the virtual
		// disk content expected after repair).
		corrupt func(t *testing.T, p string, want []byte)
		kinds   []ProblemKind
		// qemuSees: qemu-img check also reports the corruption.
		qemuSees bool
		// writable: harmless enough that Open for writing accepts it
		// (Close then trims the leak).
		writable bool
	}{
		{
			name: "in-use mark",
			corrupt: func(t *testing.T, p string, want []byte) {
				putLE32(t, p, 44, inUseMagic)
			},
			kinds: []ProblemKind{ProblemInUse}, qemuSees: true,
		},
		{
			name: "entry outside the file",
			corrupt: func(t *testing.T, p string, want []byte) {
				putLE32(t, p, batOff(4), uint32(fileSizeOf(t, p)/cs+3))
				clear(want[4*cs : 5*cs])
			},
			kinds: []ProblemKind{ProblemOutsideFile}, qemuSees: true,
		},
		{
			name: "duplicate entry",
			corrupt: func(t *testing.T, p string, want []byte) {
				// Entry 7 now shares cluster 2's host space: after repair
				// both keep what is there (cluster 2's data).
				putLE32(t, p, batOff(7), getLE32(t, p, batOff(2)))
				copy(want[7*cs:8*cs], want[2*cs:3*cs])
			},
			kinds: []ProblemKind{ProblemDuplicate},
		},
		{
			name: "leaked tail",
			corrupt: func(t *testing.T, p string, want []byte) {
				f, _ := os.OpenFile(p, os.O_RDWR|os.O_APPEND, 0)
				f.Write(bytes.Repeat([]byte{0xEE}, 3*cs))
				f.Close()
			},
			kinds: []ProblemKind{ProblemLeak}, qemuSees: true, writable: true,
		},
		{
			name: "unaligned leaked tail",
			corrupt: func(t *testing.T, p string, want []byte) {
				f, _ := os.OpenFile(p, os.O_RDWR|os.O_APPEND, 0)
				f.Write(bytes.Repeat([]byte{0xEE}, 1000))
				f.Close()
			},
			kinds: []ProblemKind{ProblemLeak, ProblemUnalignedSize}, qemuSees: true, writable: true,
		},
		{
			name: "file truncated inside the last cluster",
			corrupt: func(t *testing.T, p string, want []byte) {
				// The last host cluster holds virtual cluster 9.
				os.Truncate(p, fileSizeOf(t, p)-cs+1000)
				clear(want[9*cs+1000 : 10*cs])
			},
			kinds: []ProblemKind{ProblemTruncated, ProblemUnalignedSize},
		},
		{
			name: "file truncated inside the data",
			corrupt: func(t *testing.T, p string, want []byte) {
				// Host clusters 1..10 hold virtual 0..9; cut after 6.
				os.Truncate(p, 7*cs)
				clear(want[6*cs:])
			},
			kinds: []ProblemKind{ProblemOutsideFile},
		},
		{
			name: "data_off zero",
			corrupt: func(t *testing.T, p string, want []byte) {
				putLE32(t, p, 48, 0)
			},
			kinds: []ProblemKind{ProblemBadDataOff},
		},
		{
			name: "data_off misaligned",
			corrupt: func(t *testing.T, p string, want []byte) {
				putLE32(t, p, 48, cs/SectorSize+8)
			},
			kinds: []ProblemKind{ProblemBadDataOff},
		},
		{
			name: "entry inside the BAT",
			size: 300 << 30, // two BAT clusters at 64 KiB... 300G/64K*4 bytes: many
			corrupt: func(t *testing.T, p string, want []byte) {
				putLE32(t, p, batOff(3), 1)
				clear(want[3*cs : 4*cs])
			},
			kinds: []ProblemKind{ProblemOverlapsBAT},
		},
		{
			name: "extension offset outside the file",
			corrupt: func(t *testing.T, p string, want []byte) {
				putLE32(t, p, 56, 1<<20)
			},
			kinds: []ProblemKind{ProblemBadExtOff},
		},
		{
			name: "several at once",
			corrupt: func(t *testing.T, p string, want []byte) {
				putLE32(t, p, 44, inUseMagic)
				putLE32(t, p, batOff(1), getLE32(t, p, batOff(0)))
				copy(want[1*cs:2*cs], want[0:cs])
				putLE32(t, p, batOff(5), 1<<30)
				clear(want[5*cs : 6*cs])
				f, _ := os.OpenFile(p, os.O_RDWR|os.O_APPEND, 0)
				f.Write(make([]byte, cs))
				f.Close()
			},
			kinds:    []ProblemKind{ProblemInUse, ProblemDuplicate, ProblemOutsideFile, ProblemLeak},
			qemuSees: true,
		},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			size := c.size
			if size == 0 {
				size = 2 << 20
			}
			img, p := mustCreate(t, size, cs)
			rng := rand.New(rand.NewPCG(uint64(i), 99))
			want := make([]byte, clusters*cs)
			for k := range int64(clusters) {
				b := randomBytes(rng, cs)
				if _, err := img.WriteAt(b, k*cs); err != nil {
					t.Fatal(err)
				}
				copy(want[k*cs:], b)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			rep, err := Check(p)
			if err != nil || len(rep.Problems) != 0 {
				t.Fatalf("fresh image: %v\n%s", err, rep)
			}
			c.corrupt(t, p, want)

			rep, err = Check(p)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Clean() {
				t.Fatalf("Check missed the corruption:\n%s", rep)
			}
			var kinds []ProblemKind
			for _, pr := range rep.Problems {
				if !slices.Contains(kinds, pr.Kind) {
					kinds = append(kinds, pr.Kind)
				}
			}
			for _, k := range c.kinds {
				if !slices.Contains(kinds, k) {
					t.Fatalf("Check did not report %s:\n%s", k, rep)
				}
			}
			if len(kinds) != len(c.kinds) {
				t.Errorf("Check reported %v, want %v:\n%s", kinds, c.kinds, rep)
			}
			if c.qemuSees {
				if out, code := testcmd.Status(t, "qemu-img", "check", "-f", "parallels", p); code == 0 {
					t.Errorf("qemu-img check found nothing wrong (test corruption ineffective?):\n%s", out)
				}
			}
			if c.writable {
				ro := mustOpen(t, p, OpenOptions{ReadOnly: true})
				ro.Close()
			} else if _, err := Open(p, OpenOptions{}); err == nil {
				t.Fatal("Open for writing accepted a corrupt image")
			} else if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrInUse) {
				t.Fatalf("Open error does not say to repair: %v", err)
			}

			rep, err = Repair(p)
			if err != nil {
				t.Fatalf("repair: %v\n%s", err, rep)
			}
			if !rep.Repaired || !rep.Clean() {
				t.Fatalf("repair report:\n%s", rep)
			}
			after, err := Check(p)
			if err != nil || len(after.Problems) != 0 {
				t.Fatalf("after repair: %v\n%s", err, after)
			}
			if after.AllocatedClusters != rep.AllocatedClusters || after.FileSize != rep.FileSize {
				t.Fatalf("repair report says %d clusters, %d bytes; check says %d, %d",
					rep.AllocatedClusters, rep.FileSize, after.AllocatedClusters, after.FileSize)
			}
			qemuCheck(t, p)
			img = mustOpen(t, p, OpenOptions{})
			got := make([]byte, len(want))
			if _, err := img.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("data after repair: %s", firstDiff(got, want))
			}
			// The repaired image takes writes and stays consistent.
			if _, err := img.WriteAt([]byte("after"), 20*cs+3); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, p)
		})
	}
}

// TestRepairMisalignedV1 moves a version 1 cluster to a sector offset that
// is not cluster-aligned; Repair copies it to an aligned cluster.
func TestRepairMisalignedV1(t *testing.T) {
	const cluster = 64 << 10
	rng := rand.New(rand.NewPCG(5, 6))
	data := map[int64][]byte{0: randomBytes(rng, cluster), 2: randomBytes(rng, cluster)}
	p := filepath.Join(t.TempDir(), "v1.hdd")
	makeV1Image(t, p, 1<<20, cluster, data)
	// Cluster 2 is stored first (host cluster 1); shift it by 8 sectors.
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	f.WriteAt(data[2], 3*cluster+4096)
	f.Close()
	putLE32(t, p, batOff(2), uint32((3*cluster+4096)/SectorSize))
	rep, err := Check(p)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Clean() || rep.Problems[0].Kind != ProblemMisaligned {
		t.Fatalf("misaligned entry not reported:\n%s", rep)
	}
	if rep, err = Repair(p); err != nil || !rep.Clean() {
		t.Fatalf("repair: %v\n%s", err, rep)
	}
	if rep, err = Check(p); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("after repair: %v\n%s", err, rep)
	}
	qemuCheck(t, p)
	img := mustOpen(t, p, OpenOptions{ReadOnly: true})
	defer img.Close()
	got := make([]byte, cluster)
	img.ReadAt(got, 2*cluster)
	if !bytes.Equal(got, data[2]) {
		t.Fatalf("relocated cluster: %s", firstDiff(got, data[2]))
	}
	if off := img.hdr.entryToOffset(binary.LittleEndian.Uint32(img.meta[batOff(2):])); off%cluster != 0 {
		t.Fatalf("still misaligned at %d", off)
	}
}

func TestReportFormats(t *testing.T) {
	img, p := mustCreate(t, 1<<20, 64<<10)
	img.WriteAt([]byte{1}, 0)
	img.Close()
	putLE32(t, p, 44, inUseMagic)
	rep, err := Check(p)
	if err != nil {
		t.Fatal(err)
	}
	s := rep.String()
	if !strings.Contains(s, "ERROR in-use") || !strings.Contains(s, "check --repair") {
		t.Fatalf("human report:\n%s", s)
	}
	j, err := rep.JSON()
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(j, &back); err != nil || len(back.Problems) != 1 || back.Problems[0].Kind != ProblemInUse || back.Clean() {
		t.Fatalf("JSON report %s: %v", j, err)
	}
	rep, _ = Repair(p)
	if s := rep.String(); !strings.Contains(s, "FIXED in-use") || !strings.Contains(s, "now clean") {
		t.Fatalf("repair report:\n%s", s)
	}
	rep, _ = Check(p)
	if s := rep.String(); !strings.Contains(s, "No errors were found") {
		t.Fatalf("clean report:\n%s", s)
	}
	if j, _ := rep.JSON(); !strings.Contains(string(j), `"problems": []`) {
		t.Fatalf("clean JSON report has no empty problem list: %s", j)
	}
}

// TestRepairExtensionOverlappingData: an extension that starts inside a
// data cluster is dropped, and the space only it used is trimmed.
func TestRepairExtensionOverlappingData(t *testing.T) {
	const cs = 64 << 10
	img, p := mustCreate(t, 1<<20, cs)
	img.WriteAt(bytes.Repeat([]byte{3}, cs), 0)
	img.Close()
	// The data cluster is host cluster 1; the extension starts in its
	// middle and so ends half a cluster past the end of the file.
	putLE32(t, p, 56, (cs+cs/2)/SectorSize)
	os.Truncate(p, 2*cs+cs/2)
	rep, err := Check(p)
	if err != nil || rep.Clean() {
		t.Fatalf("check: %v\n%s", err, rep)
	}
	if rep, err = Repair(p); err != nil || !rep.Clean() {
		t.Fatalf("repair: %v\n%s", err, rep)
	}
	if rep, err = Check(p); err != nil || len(rep.Problems) != 0 {
		t.Fatalf("after repair: %v\n%s", err, rep)
	}
	if info, _ := Inspect(p); info.ExtensionOffset != 0 || info.FileSize != 2*cs {
		t.Fatalf("after repair: %+v", info)
	}
	qemuCheck(t, p)
}
