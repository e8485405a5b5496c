package ploop

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// seedImage builds a small valid image in memory: a header for size and
// cluster, the BAT with the given allocated clusters appended in order, and
// their data (a recognisable byte per cluster).
func seedImage(version int, size, cluster int64, allocated ...int64) []byte {
	h, err := newHeader(size, cluster)
	if err != nil {
		panic(err)
	}
	h.Version = version
	dataStart := int64(h.DataOff) * SectorSize
	b := make([]byte, dataStart+int64(len(allocated))*cluster)
	h.put(b)
	for k, c := range allocated {
		host := dataStart + int64(k)*cluster
		e, _ := h.offsetToEntry(host)
		binary.LittleEndian.PutUint32(b[HeaderSize+4*c:], e)
		for i := host; i < host+cluster; i += 4096 {
			b[i] = byte(c + 1)
		}
	}
	return b
}

func fuzzSeeds() [][]byte {
	const k32 = 32 << 10
	seeds := [][]byte{
		seedImage(2, 1<<20, k32),
		seedImage(2, 1<<20, k32, 0, 3, 31),
		seedImage(1, 1<<20, k32, 1, 2),
		seedImage(2, 100<<10+512, k32, 3),
	}
	// Corrupted variants: in-use mark, duplicate, outside, leak, data_off.
	v := seedImage(2, 1<<20, k32, 0, 1)
	binary.LittleEndian.PutUint32(v[44:], inUseMagic)
	seeds = append(seeds, v)
	v = seedImage(2, 1<<20, k32, 0, 1)
	copy(v[HeaderSize+4*5:], v[HeaderSize:HeaderSize+4])
	seeds = append(seeds, v)
	v = seedImage(2, 1<<20, k32, 0, 1)
	binary.LittleEndian.PutUint32(v[HeaderSize+4*7:], 1000)
	seeds = append(seeds, v)
	v = append(seedImage(2, 1<<20, k32, 0), make([]byte, 1000)...)
	seeds = append(seeds, v)
	v = seedImage(2, 1<<20, k32, 2)
	binary.LittleEndian.PutUint32(v[48:], 3)
	seeds = append(seeds, v)
	v = seedImage(2, 1<<20, k32, 2)
	binary.LittleEndian.PutUint64(v[56:], 2*k32/SectorSize)
	seeds = append(seeds, v)
	return append(seeds, []byte(sigV2), nil)
}

// FuzzHeader: ParseHeader never panics, and what it accepts re-encodes to
// the same header.
func FuzzHeader(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s[:min(len(s), HeaderSize)])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			return
		}
		if h.ClusterSize() <= 0 || h.ClusterSize() > MaxClusterSize || h.Size() < 0 {
			t.Fatalf("accepted header with cluster %d size %d", h.ClusterSize(), h.Size())
		}
		if uint64(h.BATEntries)*uint64(h.Tracks) < h.Sectors {
			t.Fatalf("accepted a BAT that does not cover the disk: %+v", h)
		}
		back, err := ParseHeader(h.Marshal())
		if err != nil || back != h {
			t.Fatalf("round trip: %+v -> %+v, %v", h, back, err)
		}
		if h.Version == 2 {
			// Only the high bits of nb_sectors are dropped for v1.
			if !bytes.Equal(h.Marshal(), b[:HeaderSize]) {
				t.Fatalf("re-encoding changed bytes")
			}
		}
	})
}

// FuzzOpen: whatever the file holds, Open returns an error or an image that
// reads without panicking; Check never panics; and when Repair succeeds the
// image is clean and opens for writing.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 8<<20 {
			return
		}
		p := filepath.Join(t.TempDir(), "f.hdd")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if img, err := Open(p, OpenOptions{ReadOnly: true}); err == nil {
			exerciseReads(t, img)
			img.Close()
		}
		rep, err := Check(p)
		if err != nil {
			return
		}
		// Repair copies duplicated clusters; bound the work per input.
		copies := int64(0)
		for _, pr := range rep.Problems {
			if pr.Kind == ProblemDuplicate || pr.Kind == ProblemMisaligned {
				copies++
			}
		}
		if copies*rep.ClusterSize > 64<<20 || int64(len(b)) > 1<<20 && rep.ClusterSize > 1<<20 {
			return
		}
		if _, err := Repair(p); err != nil {
			if errors.Is(err, ErrNotPloop) {
				t.Fatalf("Repair failed where Check worked: %v", err)
			}
			return
		}
		after, err := Check(p)
		if err != nil || len(after.Problems) != 0 {
			t.Fatalf("not clean after repair: %v\n%s\nbefore:\n%s", err, after, rep)
		}
		img, err := Open(p, OpenOptions{})
		if err != nil {
			t.Fatalf("repaired image does not open for writing: %v", err)
		}
		exerciseReads(t, img)
		if img.Size() >= 4 {
			if _, err := img.WriteAt([]byte("fuzz"), img.Size()/2); err != nil {
				t.Fatal(err)
			}
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		if after, err := Check(p); err != nil || len(after.Problems) != 0 {
			t.Fatalf("not clean after a write: %v\n%s", err, after)
		}
	})
}

func exerciseReads(t *testing.T, img *Image) {
	buf := make([]byte, 64<<10)
	size := img.Size()
	for _, off := range []int64{0, size / 3, max(0, size-int64(len(buf)))} {
		n := min(int64(len(buf)), size-off)
		if n <= 0 {
			continue
		}
		if _, err := img.ReadAt(buf[:n], off); err != nil {
			t.Fatalf("read of an image Open accepted: %v", err)
		}
		if _, _, err := img.Extent(off, n); err != nil {
			t.Fatal(err)
		}
	}
	img.Map()
}
