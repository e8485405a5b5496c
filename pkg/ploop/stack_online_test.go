package ploop

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// onlineBlock is the unit the online tests' writers write: smaller than a
// cluster, so most first writes after a snapshot are copy-ups.
const onlineBlock = 4096

// blockVersion is one write of a block: its content is derived from
// (block, version) and the times bracket the WriteAt call.
type blockVersion struct {
	version    uint64
	start, end time.Time
}

// onlineModel records every version of every block. Each block is written
// by a single writer, so its versions are ordered.
type onlineModel struct {
	mu     sync.Mutex
	blocks [][]blockVersion
}

func blockContent(block int, version uint64) []byte {
	b := make([]byte, onlineBlock)
	if version == 0 {
		return b // never written: zeros
	}
	for i := 0; i < onlineBlock; i += 16 {
		binary.LittleEndian.PutUint64(b[i:], uint64(block))
		binary.LittleEndian.PutUint64(b[i+8:], version)
	}
	return b
}

// versionOf decodes which version a block's content is, or -1 if it is
// none (a torn or foreign write).
func versionOf(block int, b []byte) int64 {
	v := binary.LittleEndian.Uint64(b[8:])
	if !bytes.Equal(b, blockContent(block, v)) {
		return -1
	}
	return int64(v)
}

// window is the range of versions of block that a snapshot taken during
// [from, to] may hold: at least the last one finished before from, at
// most the last one started before to.
func (m *onlineModel) window(block int, from, to time.Time) (lo, hi uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.blocks[block] {
		if !v.end.IsZero() && v.end.Before(from) {
			lo = v.version
		}
		if v.start.Before(to) {
			hi = v.version
		}
	}
	return lo, hi
}

func (m *onlineModel) last(block int) uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	vs := m.blocks[block]
	if len(vs) == 0 {
		return 0
	}
	return vs[len(vs)-1].version
}

// checkView asserts that every block of disk is a version inside the
// window of [from, to].
func (m *onlineModel) checkView(t *testing.T, what string, disk []byte, from, to time.Time) {
	t.Helper()
	for blk := range m.blocks {
		got := versionOf(blk, disk[blk*onlineBlock:(blk+1)*onlineBlock])
		lo, hi := m.window(blk, from, to)
		if got < int64(lo) || got > int64(hi) {
			t.Fatalf("%s: block %d holds version %d, want one in [%d, %d]", what, blk, got, lo, hi)
		}
	}
}

// onlineWriters write random blocks of s, each writer its own blocks,
// until stop is closed; progress gets a token every few writes.
// The writers write only to the region phase selects (one of regions),
// so that the copy-ups of a phase do not cover what earlier phases wrote
// and merges must really move data.
func onlineWriters(t *testing.T, s io.WriterAt, m *onlineModel, writers int, phase *atomic.Int64, regions int, stop <-chan struct{}, progress chan<- struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	var failed atomic.Bool
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			var mine []int
			for b := w; b < len(m.blocks); b += writers {
				mine = append(mine, b)
			}
			for n := uint64(1); ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				per := len(mine) / regions
				region := int(phase.Load()) % regions
				blk := mine[region*per+rng.IntN(per)]
				v := m.last(blk) + 1
				// The version is in the model before the write starts,
				// so a view checked while it is in flight allows it.
				m.mu.Lock()
				m.blocks[blk] = append(m.blocks[blk], blockVersion{version: v, start: time.Now()})
				k := len(m.blocks[blk]) - 1
				m.mu.Unlock()
				if _, err := s.WriteAt(blockContent(blk, v), int64(blk)*onlineBlock); err != nil {
					if failed.CompareAndSwap(false, true) {
						t.Errorf("writer %d: %v", w, err)
					}
					return
				}
				m.mu.Lock()
				m.blocks[blk][k].end = time.Now()
				m.mu.Unlock()
				if n%16 == 0 {
					select {
					case progress <- struct{}{}:
					default:
					}
				}
			}
		}()
	}
	return &wg
}

// TestStackOnline takes snapshots, merges them (into a lower delta and into
// the top) and grows the stack while writers write to it, and checks every
// snapshot and the final disk against the model of what was written.
func TestStackOnline(t *testing.T) {
	const (
		size    = 8 << 20
		cluster = 64 << 10
		writers = 4
	)
	for _, tc := range []struct {
		name        string
		raw, direct bool
		// mapped writes as a ublk queue does: where MapWrite places
		// them, else through WriteAt.
		mapped bool
	}{
		{"ploop-base", false, false, false},
		{"raw-base", true, false, false},
		{"direct", false, true, false},
		{"mapped", false, false, true},
		{"mapped-raw-base", true, false, true},
		{"mapped-direct", false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "vol")
			if err := InitStack(dir, InitOptions{Size: size, ClusterSize: cluster, RawBase: tc.raw}); err != nil {
				t.Fatal(err)
			}
			s := mustOpenStack(t, dir, StackOptions{Direct: tc.direct})
			m := &onlineModel{blocks: make([][]blockVersion, size/onlineBlock)}
			stop := make(chan struct{})
			progress := make(chan struct{})
			var phase atomic.Int64
			var w io.WriterAt = s
			mio := &mappedIO{s: s}
			if tc.mapped {
				w = mio
			}
			wg := onlineWriters(t, w, m, writers, &phase, 8, stop, progress)
			stopped := false
			stopWriters := func() {
				if !stopped {
					stopped = true
					close(stop)
					wg.Wait()
				}
			}
			defer stopWriters()
			// waitWrites lets the writers make progress between operations.
			waitWrites := func() {
				phase.Add(1)
				for range 8 {
					select {
					case <-progress:
					case <-time.After(time.Minute):
						t.Fatal("writers made no progress")
					}
				}
			}
			type shot struct {
				guid     string
				from, to time.Time
			}
			var shots []shot
			var pauses []time.Duration
			snap := func() shot {
				from := time.Now()
				guid, st, err := s.Snapshot()
				if err != nil {
					t.Fatal(err)
				}
				sh := shot{guid, from, time.Now()}
				pauses = append(pauses, st.Pause)
				shots = append(shots, sh)
				m.checkView(t, "snapshot "+guid, readStack(t, dir, guid), sh.from, sh.to)
				return sh
			}
			checkShots := func(when string) {
				for _, sh := range shots {
					m.checkView(t, when+": snapshot "+sh.guid, readStack(t, dir, sh.guid), sh.from, sh.to)
				}
			}
			deleteShot := func(i int) {
				st, err := s.DeleteSnapshot(shots[i].guid)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("merge of %s paused I/O for %v", shots[i].guid, st.Pause)
				shots = append(shots[:i], shots[i+1:]...)
			}

			for range 3 {
				waitWrites()
				snap()
			}
			waitWrites()
			deleteShot(1) // merged into the delta of the next snapshot
			checkShots("after a merge below the top")
			waitWrites()
			deleteShot(1) // the newest snapshot: merged into the top
			checkShots("after a merge into the top")
			if got := s.Depth(); got != 2 {
				t.Fatalf("depth %d after deleting two of three snapshots, want 2", got)
			}
			waitWrites()
			st, err := s.Grow(2 * size)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("grow paused I/O for %v", st.Pause)
			if s.Size() != 2*size {
				t.Fatalf("size %d after grow, want %d", s.Size(), 2*size)
			}
			tail := bytes.Repeat([]byte("after grow"), 1000)
			if _, err := s.WriteAt(tail, size+100); err != nil {
				t.Fatal(err)
			}
			// Clusters that were written and then zeroed (kept allocated)
			// give the compaction below something to unallocate and move.
			junk := bytes.Repeat([]byte("junk"), 1<<18)
			if _, err := s.WriteAt(junk, size+2<<20); err != nil {
				t.Fatal(err)
			}
			waitWrites()
			if err := s.WriteZeroes(size+2<<20, int64(len(junk)), true); err != nil {
				t.Fatal(err)
			}
			res, st, err := s.Compact()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("compact paused I/O for %v: %+v", st.Pause, res)
			if res.ZeroClusters < int64(len(junk))/cluster || res.FileSizeAfter >= res.FileSizeBefore {
				t.Fatalf("compact of a top with %d zeroed clusters: %+v", int64(len(junk))/cluster, res)
			}
			checkShots("after compact")
			waitWrites()
			snap()
			waitWrites()
			stopWriters()

			final := readAll(t, s)
			m.checkView(t, "final disk", final[:size], time.Now(), time.Now())
			if tc.mapped {
				if mio.mapped.Load() == 0 {
					t.Fatal("no write was placed by MapWrite")
				}
				t.Logf("%d of the requests were placed by the mapper", mio.mapped.Load())
				if got := readAll(t, mio); !bytes.Equal(got, final) {
					t.Fatalf("mapped reads differ from ReadAt: %s", firstDiff(got, final))
				}
			}
			want := make([]byte, size)
			copy(want[100:], tail)
			if !bytes.Equal(final[size:], want) {
				t.Fatalf("grown area: %s", firstDiff(final[size:], want))
			}
			checkShots("at the end")
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readStack(t, dir, ""), final) {
				t.Fatal("the reopened stack differs from what was served")
			}
			rep, err := CheckStack(dir)
			if err != nil {
				t.Fatal(err)
			}
			if !rep.Clean() {
				t.Fatalf("check stack: %+v", rep)
			}
			d, err := ReadDescriptor(dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, im := range d.Chain() {
				if im.Type == TypeCompressed {
					qemuCheck(t, filepath.Join(dir, im.File))
				}
			}
			t.Logf("snapshot pauses under I/O: %v", pauses)
		})
	}
}

// TestStackOnlineErrors covers the refusals of the online operations.
func TestStackOnlineErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustInit(t, dir, false)
	ro := mustOpenStack(t, dir, StackOptions{ReadOnly: true})
	if _, _, err := ro.Snapshot(); !errors.Is(err, unix.EPERM) {
		t.Fatalf("snapshot of a read-only stack: %v, want EPERM", err)
	}
	if _, _, err := ro.Compact(); !errors.Is(err, unix.EPERM) {
		t.Fatalf("compact of a read-only stack: %v, want EPERM", err)
	}
	ro.Close()
	s := mustOpenStack(t, dir, StackOptions{})
	defer s.Close()
	// The served stack holds the lock: the offline operations refuse.
	if _, err := Snapshot(dir); err == nil {
		t.Fatal("offline snapshot of a served stack succeeded")
	}
	top := s.chain[len(s.chain)-1].GUID
	for _, tc := range []struct {
		guid string
		want error
	}{
		{top, unix.EINVAL},
		{NewGUID(), os.ErrNotExist},
	} {
		if _, err := s.DeleteSnapshot(tc.guid); !errors.Is(err, tc.want) {
			t.Errorf("delete %s: %v, want %v", tc.guid, err, tc.want)
		}
	}
	if _, err := s.Grow(stackSize - 4096); !errors.Is(err, unix.EINVAL) {
		t.Errorf("shrink: %v, want EINVAL", err)
	}
}

// TestStackOnlineGrowRelocation grows a served stack so far that the BAT
// must take over the first data clusters, while writers keep writing (also
// to the clusters being moved), and checks the disk against the model.
func TestStackOnlineGrowRelocation(t *testing.T) {
	const (
		size    = 8 << 20
		cluster = 32 << 10
		grown   = 1 << 30 // 32768 BAT entries: four clusters of BAT
	)
	dir := filepath.Join(t.TempDir(), "vol")
	if err := InitStack(dir, InitOptions{Size: size, ClusterSize: cluster}); err != nil {
		t.Fatal(err)
	}
	s := mustOpenStack(t, dir, StackOptions{})
	m := &onlineModel{blocks: make([][]blockVersion, size/onlineBlock)}
	stop := make(chan struct{})
	progress := make(chan struct{})
	var phase atomic.Int64
	wg := onlineWriters(t, s, m, 4, &phase, 1, stop, progress)
	waitWrites := func() {
		for range 8 {
			select {
			case <-progress:
			case <-time.After(time.Minute):
				t.Fatal("writers made no progress")
			}
		}
	}
	waitWrites()
	before := s.top().(*Image).hdr.DataOff
	st, err := s.Grow(grown)
	waitWrites()
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	after := s.top().(*Image).hdr.DataOff
	t.Logf("grow with relocation (data_off %d -> %d sectors) paused I/O for %v", before, after, st.Pause)
	if after <= before {
		t.Fatalf("data_off %d -> %d: the grow relocated nothing", before, after)
	}
	disk := make([]byte, size)
	if _, err := s.ReadAt(disk, 0); err != nil {
		t.Fatal(err)
	}
	m.checkView(t, "disk after grow", disk, time.Now(), time.Now())
	tail := make([]byte, 1<<20)
	if _, err := s.ReadAt(tail, grown-int64(len(tail))); err != nil || !allZero(tail) {
		t.Fatalf("end of the grown disk: %v, zero %v", err, allZero(tail))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if rep, err := CheckStack(dir); err != nil || !rep.Clean() {
		t.Fatalf("check stack: %+v %v", rep, err)
	}
	qemuCheck(t, filepath.Join(dir, baseFile))
}

// TestStackOnlineCompactRescan: a cluster found all-zero by the online
// compaction's scan and written before the pause keeps its new data, and
// zero clusters of the top that hide lower data stay allocated.
func TestStackOnlineCompactRescan(t *testing.T) {
	const (
		size    = 4 << 20
		cluster = 64 << 10
	)
	dir := filepath.Join(t.TempDir(), "vol")
	if err := InitStack(dir, InitOptions{Size: size, ClusterSize: cluster}); err != nil {
		t.Fatal(err)
	}
	s := mustOpenStack(t, dir, StackOptions{})
	defer s.Close()
	model := make([]byte, size)
	write := func(p []byte, off int64) {
		t.Helper()
		if _, err := s.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	zero := func(off, n int64) {
		t.Helper()
		if err := s.WriteZeroes(off, n, true); err != nil {
			t.Fatal(err)
		}
		clear(model[off : off+n])
	}
	write(bytes.Repeat([]byte("lower"), 4*cluster/5+1)[:4*cluster], 0)
	if _, _, err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	zero(0, 4*cluster) // hides the lower data: must stay
	write(bytes.Repeat([]byte("junk"), 1<<18), 1<<20)
	write(bytes.Repeat([]byte("tail"), cluster/4), 3<<20) // moved down
	zero(1<<20, 1<<20)
	fresh := bytes.Repeat([]byte("fresh"), cluster/5)
	s.top().(*Image).hooks = &hooks{fn: func(point string) {
		if point == "compact-scanned" {
			write(fresh, 1<<20+cluster+7)
		}
	}}
	res, st, err := s.Compact()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("compact paused I/O for %v: %+v", st.Pause, res)
	want := CompactResult{ZeroClusters: 16 - 2, KeptZeroClusters: 4, MovedClusters: 1}
	if res.ZeroClusters != want.ZeroClusters || res.KeptZeroClusters != want.KeptZeroClusters || res.MovedClusters < want.MovedClusters {
		t.Fatalf("compact: %+v, want %+v", res, want)
	}
	if got := readAll(t, s); !bytes.Equal(got, model) {
		t.Fatalf("after compact: %s", firstDiff(got, model))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := readStack(t, dir, ""); !bytes.Equal(got, model) {
		t.Fatalf("reopened after compact: %s", firstDiff(got, model))
	}
	qemuCheckTop(t, dir)
}
