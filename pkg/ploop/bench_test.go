package ploop

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkIO measures the same I/O patterns through a ploop image and a
// raw file (test/bench/bench-ploop.sh prints the ratios). Each iteration
// runs the whole pattern over a benchDataset-byte disk and ends with a
// Flush, so write numbers include making the data durable.
//
// Patterns: seq-write-1M into a fresh image (allocating), seq-read-1M,
// rand-write-4K over allocated data, rand-write-4K-alloc into a fresh image
// (one cluster allocation per write at first), rand-read-4K.
func BenchmarkIO(b *testing.B) {
	for _, direct := range []bool{false, true} {
		mode := "buffered"
		if direct {
			mode = "direct"
		}
		// raw and ploop run back to back per pattern, so that both see
		// the same load on a shared machine; PLOOP_BENCH_PLOOP_FIRST=1
		// swaps their order (the second of a pair can find the page cache
		// in a different state).
		kinds := []string{"raw", "ploop"}
		if os.Getenv("PLOOP_BENCH_PLOOP_FIRST") == "1" {
			kinds = []string{"ploop", "raw"}
		}
		for _, pat := range []string{"seq-write-1M", "seq-read-1M", "rand-write-4K", "rand-write-4K-alloc", "rand-read-4K"} {
			for _, kind := range kinds {
				b.Run(mode+"/"+pat+"/"+kind, func(b *testing.B) { benchPattern(b, kind, pat, direct) })
			}
		}
	}
}

const (
	benchDataset = 256 << 20
	benchRandOps = 8192
)

type benchDisk interface {
	ReadAt([]byte, int64) (int, error)
	WriteAt([]byte, int64) (int, error)
	Flush() error
	Close() error
}

func openBenchDisk(b *testing.B, kind, path string, direct, fresh bool) benchDisk {
	b.Helper()
	if fresh {
		os.Remove(path)
		if kind == "raw" {
			f, err := os.Create(path)
			if err != nil {
				b.Fatal(err)
			}
			f.Truncate(benchDataset)
			f.Close()
		} else {
			img, err := Create(path, CreateOptions{Size: benchDataset})
			if err != nil {
				b.Fatal(err)
			}
			img.Close()
		}
	}
	if kind == "raw" {
		r, err := OpenRawWith(path, OpenOptions{Direct: direct})
		if err != nil {
			b.Fatal(err)
		}
		return r
	}
	img, err := Open(path, OpenOptions{Direct: direct})
	if err != nil {
		b.Fatal(err)
	}
	return img
}

func benchPattern(b *testing.B, kind, pat string, direct bool) {
	path := filepath.Join(b.TempDir(), "bench."+kind)
	buf1M := alignedBuffer(1 << 20)
	buf4K := alignedBuffer(4096)
	rng := rand.New(rand.NewPCG(1, 2))
	copy(buf1M, randomBytes(rng, len(buf1M)))
	copy(buf4K, buf1M)
	offsets := make([]int64, benchRandOps)
	for i := range offsets {
		offsets[i] = rng.Int64N(benchDataset/4096) * 4096
	}
	// Data to read or overwrite exists before the timer starts.
	prefill := func() {
		d := openBenchDisk(b, kind, path, false, true)
		for off := int64(0); off < benchDataset; off += 1 << 20 {
			if _, err := d.WriteAt(buf1M, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			b.Fatal(err)
		}
	}
	switch pat {
	case "seq-read-1M", "rand-read-4K", "rand-write-4K":
		prefill()
	}
	if pat == "seq-write-1M" || pat == "seq-read-1M" {
		b.SetBytes(benchDataset)
	} else {
		b.SetBytes(benchRandOps * 4096)
	}
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		fresh := pat == "seq-write-1M" || pat == "rand-write-4K-alloc"
		d := openBenchDisk(b, kind, path, direct, fresh)
		b.StartTimer()
		var err error
		switch pat {
		case "seq-write-1M":
			for off := int64(0); off < benchDataset && err == nil; off += 1 << 20 {
				_, err = d.WriteAt(buf1M, off)
			}
		case "seq-read-1M":
			for off := int64(0); off < benchDataset && err == nil; off += 1 << 20 {
				_, err = d.ReadAt(buf1M, off)
			}
		case "rand-write-4K", "rand-write-4K-alloc":
			for _, off := range offsets {
				if _, err = d.WriteAt(buf4K, off); err != nil {
					break
				}
			}
		case "rand-read-4K":
			for _, off := range offsets {
				if _, err = d.ReadAt(buf4K, off); err != nil {
					break
				}
			}
		}
		if err == nil {
			err = d.Flush()
		}
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := d.Close(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
