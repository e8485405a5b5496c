package ploop

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkOnlinePause moves MiB of data inside a served stack while four
// writers keep writing, once by online compaction (the first half of the
// disk is allocated zeros, the second half data that moves down) and once
// by a grow whose larger BAT needs the first MiB of data clusters moved
// away. It reports the I/O pauses the operation took, the longest write
// latency the writers saw during the operation, and as the reference from
// the same run the longest write latency over as long a time before it and
// the time the move took (what I/O would have waited had the data moved
// inside a pause): test/bench/bench-pause.sh prints the table.
// PLOOP_BENCH_PAUSE_MIB lists the sizes (default "32:1024").
func BenchmarkOnlinePause(b *testing.B) {
	sizes := []int64{32, 1024}
	if v := os.Getenv("PLOOP_BENCH_PAUSE_MIB"); v != "" {
		sizes = nil
		for _, f := range filepath.SplitList(v) {
			n, err := strconv.ParseInt(f, 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, mib := range sizes {
		b.Run("compact/"+strconv.FormatInt(mib, 10)+"MiB", func(b *testing.B) { benchPause(b, mib, "compact") })
		b.Run("grow/"+strconv.FormatInt(mib, 10)+"MiB", func(b *testing.B) { benchPause(b, mib, "grow") })
	}
}

// pauseWriters write 4 KiB blocks at random and track the longest write.
type pauseWriters struct {
	stop    chan struct{}
	wg      sync.WaitGroup
	writes  atomic.Int64
	longest atomic.Int64 // ns
}

func startPauseWriters(b *testing.B, s *Stack, size int64) *pauseWriters {
	w := &pauseWriters{stop: make(chan struct{})}
	for k := range 4 {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			rng := rand.New(rand.NewPCG(uint64(k), 1))
			buf := make([]byte, 4096)
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				t0 := time.Now()
				if _, err := s.WriteAt(buf, rng.Int64N(size/4096)*4096); err != nil {
					b.Error(err)
					return
				}
				d := int64(time.Since(t0))
				for old := w.longest.Load(); d > old && !w.longest.CompareAndSwap(old, d); old = w.longest.Load() {
				}
				w.writes.Add(1)
			}
		}()
	}
	return w
}

// window resets the statistics and returns those of the window before.
func (w *pauseWriters) window() (writes int64, longest time.Duration) {
	return w.writes.Swap(0), time.Duration(w.longest.Swap(0))
}

func benchPause(b *testing.B, mib int64, op string) {
	const cluster = 1 << 20
	moved := mib << 20
	for range b.N {
		b.StopTimer()
		dir := filepath.Join(b.TempDir(), "vol")
		size := 2 * moved
		if err := InitStack(dir, InitOptions{Size: size, ClusterSize: cluster}); err != nil {
			b.Fatal(err)
		}
		s, err := OpenStack(dir, StackOptions{})
		if err != nil {
			b.Fatal(err)
		}
		data := make([]byte, cluster)
		for i := range data {
			data[i] = byte(i*7 + 1)
		}
		zeros := make([]byte, cluster)
		for off := int64(0); off < size; off += cluster {
			p := data
			if op == "compact" && off < moved {
				p = zeros // allocated zeros: unmapped, then filled from the end
			}
			if op == "grow" && off >= moved {
				break // only the first MiB are data clusters to relocate
			}
			if _, err := s.WriteAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := s.Flush(); err != nil {
			b.Fatal(err)
		}
		w := startPauseWriters(b, s, size)
		run := func() (OnlineStats, error) {
			switch op {
			case "compact":
				_, st, err := s.Compact()
				return st, err
			default:
				// A BAT of moved bytes: moved/4 entries of 1 MiB clusters.
				return s.Grow(moved / 4 * cluster)
			}
		}
		b.StartTimer()
		t0 := time.Now()
		st, err := run()
		took := time.Since(t0)
		b.StopTimer()
		writes, longest := w.window()
		// The reference window: the same writers, as long, no operation.
		time.Sleep(took)
		_, before := w.window()
		close(w.stop)
		w.wg.Wait()
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(st.Pause.Microseconds())/1000, "pause-ms")
		b.ReportMetric(float64(st.Pauses), "pauses")
		b.ReportMetric(float64(longest.Microseconds())/1000, "max-write-ms")
		b.ReportMetric(float64(before.Microseconds())/1000, "max-write-idle-ms")
		b.ReportMetric(float64(took.Milliseconds()), "op-ms")
		b.ReportMetric(float64(writes)/took.Seconds(), "writes/s")
		s.Close()
	}
}
