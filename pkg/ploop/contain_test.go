package ploop

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A long-lived server keeps calling objects that another goroutine closed
// or that a failed online operation gave up: every such call must fail
// with os.ErrClosed, never reach a nil delta.

// closedCalls are the calls every Disk offers.
func closedCalls(d Disk) map[string]func() error {
	buf := make([]byte, 4096)
	return map[string]func() error{
		"ReadAt":        func() error { _, err := d.ReadAt(buf, 0); return err },
		"WriteAt":       func() error { _, err := d.WriteAt(buf, 0); return err },
		"Flush":         d.Flush,
		"Discard":       func() error { return d.Discard(0, 4096) },
		"WriteZeroes":   func() error { return d.WriteZeroes(0, 4096, true) },
		"Extent":        func() error { _, _, err := d.Extent(0, 4096); return err },
		"ReadFile":      func() error { return d.ReadFile(0, 4096, func(*os.File, int64, int64) error { return nil }) },
		"Close (again)": d.Close,
	}
}

func stackCalls(s *Stack) map[string]func() error {
	calls := closedCalls(s)
	calls["Map"] = func() error { _, err := s.Map(); return err }
	calls["Snapshot"] = func() error { _, _, err := s.Snapshot(); return err }
	calls["DeleteSnapshot"] = func() error { _, err := s.DeleteSnapshot(NewGUID()); return err }
	calls["Grow"] = func() error { _, err := s.Grow(64 << 20); return err }
	calls["Compact"] = func() error { _, _, err := s.Compact(); return err }
	return calls
}

func expectClosed(t *testing.T, calls map[string]func() error) {
	t.Helper()
	for name, call := range calls {
		if err := call(); !errors.Is(err, os.ErrClosed) {
			t.Errorf("%s after close: %v, want an error wrapping os.ErrClosed", name, err)
		}
	}
}

func TestCallsAfterCloseFail(t *testing.T) {
	for _, tc := range []struct {
		name string
		open func(t *testing.T) Disk
	}{
		{"image", func(t *testing.T) Disk { img, _ := mustCreate(t, 8<<20, 64<<10); return img }},
		{"raw", func(t *testing.T) Disk {
			p := filepath.Join(t.TempDir(), "raw")
			if err := os.WriteFile(p, make([]byte, 8<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			r, err := OpenRaw(p, false)
			if err != nil {
				t.Fatal(err)
			}
			return r
		}},
		{"stack", func(t *testing.T) Disk {
			dir := filepath.Join(t.TempDir(), "vol")
			mustInit(t, dir, false)
			return mustOpenStack(t, dir, StackOptions{})
		}},
		{"stack-raw-base", func(t *testing.T) Disk {
			dir := filepath.Join(t.TempDir(), "vol")
			mustInit(t, dir, true)
			return mustOpenStack(t, dir, StackOptions{})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := tc.open(t)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			calls := closedCalls(d)
			if s, ok := d.(*Stack); ok {
				calls = stackCalls(s)
			}
			expectClosed(t, calls)
		})
	}
}

// faultAfter fails op, once armed, on the file named file, or on every
// file whose name starts with file when it ends in a dot.
type faultAfter struct {
	armed    atomic.Bool
	op, file string
	hits     atomic.Int64
}

var errInjected = errors.New("injected storage fault")

func (f *faultAfter) fn(op, path string) error {
	name := filepath.Base(path)
	match := name == f.file || strings.HasSuffix(f.file, ".") && strings.HasPrefix(name, f.file)
	if f.armed.Load() && op == f.op && match {
		f.hits.Add(1)
		return errInjected
	}
	return nil
}

// TestOnlineFailureContained fails one storage call inside each online
// operation. The operation reports the failure; the stack then either
// still serves the same data or, when the operation could not leave it
// servable, is closed and every call fails with os.ErrClosed. Nothing
// panics, and what is on disk still opens (after repair) with the data
// written before the failure.
func TestOnlineFailureContained(t *testing.T) {
	const size, cluster = 8 << 20, 64 << 10
	for _, tc := range []struct {
		name string
		// fault picks the failing call; file "" means the top delta.
		op, file string
		run      func(s *Stack) error
		// closes: the stack cannot go on after this failure.
		closes bool
		raw    bool
	}{
		{name: "snapshot: frozen delta cannot be reopened", op: "open", file: "root.hds",
			run: func(s *Stack) error { _, _, err := s.Snapshot(); return err }},
		{name: "snapshot: descriptor switch fails", op: "rename", file: DescriptorName,
			run: func(s *Stack) error { _, _, err := s.Snapshot(); return err }},
		{name: "grow of a raw top: reopen fails", op: "open", file: "root.hds", raw: true,
			run: func(s *Stack) error { _, err := s.Grow(2 * size); return err }, closes: true},
		{name: "snapshot: new delta cannot be written", op: "write", file: "root.hds.",
			run: func(s *Stack) error { _, _, err := s.Snapshot(); return err }},
		{name: "grow: relocation copy fails", op: "write", file: "root.hds",
			run: func(s *Stack) error { _, err := s.Grow(64 << 30); return err }},
		{name: "grow: sync fails", op: "sync", file: "root.hds",
			run: func(s *Stack) error { _, err := s.Grow(2 * size); return err }},
		{name: "compact: unmapping zeros fails", op: "write", file: "root.hds",
			run: func(s *Stack) error { _, _, err := s.Compact(); return err }},
		{name: "compact: truncation fails", op: "truncate", file: "root.hds",
			run: func(s *Stack) error { _, _, err := s.Compact(); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "vol")
			if err := InitStack(dir, InitOptions{Size: size, ClusterSize: cluster, RawBase: tc.raw}); err != nil {
				t.Fatal(err)
			}
			f := &faultAfter{op: tc.op, file: tc.file}
			s := mustOpenStack(t, dir, StackOptions{faults: f.fn})
			defer s.Close()
			// Data everywhere, and zeroed clusters for compaction.
			data := bytes.Repeat([]byte("before the failure "), size/19+1)[:size]
			if _, err := s.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if err := s.WriteZeroes(cluster, 4*cluster, true); err != nil {
				t.Fatal(err)
			}
			clear(data[cluster : 5*cluster])
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			f.armed.Store(true)
			err := tc.run(s)
			f.armed.Store(false)
			if !errors.Is(err, errInjected) {
				t.Fatalf("operation: %v, want the injected fault (hits %d)", err, f.hits.Load())
			}
			if tc.closes {
				expectClosed(t, stackCalls(s))
			} else if got := readAll(t, s); !bytes.Equal(got[:size], data) {
				t.Fatalf("after the failed operation: %s", firstDiff(got[:size], data))
			}
			s.Close()
			if _, err := RepairStack(dir); err != nil {
				t.Fatal(err)
			}
			if got := readStack(t, dir, ""); !bytes.Equal(got[:size], data) {
				t.Fatalf("reopened after repair: %s", firstDiff(got[:size], data))
			}
		})
	}
}

// TestOnlineMovesRunOutsidePause moves clusters with online compaction and
// a relocating grow, and at every cluster copy checks that I/O is not
// paused and that writes go through. Neither operation pauses I/O at all,
// however much data moves.
func TestOnlineMovesRunOutsidePause(t *testing.T) {
	const cluster = 32 << 10
	for _, clusters := range []int64{64, 1024} {
		dir := filepath.Join(t.TempDir(), "vol")
		// 16 MiB of BAT room at most: a grow to 64 GiB relocates.
		if err := InitStack(dir, InitOptions{Size: clusters * cluster, ClusterSize: cluster}); err != nil {
			t.Fatal(err)
		}
		s := mustOpenStack(t, dir, StackOptions{})
		model := make([]byte, clusters*cluster)
		var probeOffsets []int64
		for i := range clusters {
			b := bytes.Repeat([]byte{byte(i), byte(i >> 8), 0xAB}, cluster/3+1)[:cluster]
			if i%2 == 1 {
				// Allocated zeros: compaction unmaps them and fills
				// the holes with the clusters at the end.
				clear(b)
			}
			if _, err := s.WriteAt(b, i*cluster); err != nil {
				t.Fatal(err)
			}
			copy(model[i*cluster:], b)
		}
		// Probe writes go out from other goroutines at every copy; they
		// may wait for the batch that holds their cluster, never for the
		// whole operation.
		copies := 0
		var probes sync.WaitGroup
		var probeErr atomic.Value
		var during atomic.Int64
		opDone := make(chan struct{})
		s.topImage().hooks = &hooks{fn: func(point string) {
			if !strings.HasSuffix(point, "-copy") {
				return
			}
			copies++
			if !s.io.TryRLock() {
				t.Errorf("%s: I/O is paused while a cluster is copied", point)
				return
			}
			s.io.RUnlock()
			k := int64(len(probeOffsets))
			off := (k*7)%clusters*cluster + 16*(k/clusters) + 8
			probeOffsets = append(probeOffsets, off)
			probes.Add(1)
			go func() {
				defer probes.Done()
				if _, err := s.WriteAt([]byte("probe..."), off); err != nil {
					probeErr.Store(err)
				}
				select {
				case <-opDone:
				default:
					during.Add(1)
				}
			}()
		}}
		res, st, err := s.Compact()
		if err != nil {
			t.Fatal(err)
		}
		if res.MovedClusters < clusters/4 {
			t.Fatalf("%d clusters: compaction moved %d, want at least %d", clusters, res.MovedClusters, clusters/4)
		}
		if st.Pauses != 0 {
			t.Fatalf("%d clusters: compaction paused I/O %d times", clusters, st.Pauses)
		}
		t.Logf("%d clusters: compaction moved %d clusters (%d copies) with %d pauses, longest %v",
			clusters, res.MovedClusters, copies, st.Pauses, st.Pause)
		copies = 0
		gst, err := s.Grow(64 << 30)
		if err != nil {
			t.Fatal(err)
		}
		if copies == 0 {
			t.Fatalf("%d clusters: the grow relocated nothing", clusters)
		}
		if gst.Pauses != 0 {
			t.Fatalf("%d clusters: grow paused I/O %d times", clusters, gst.Pauses)
		}
		t.Logf("%d clusters: grow relocated %d clusters with %d pauses, longest %v", clusters, copies, gst.Pauses, gst.Pause)
		close(opDone)
		probes.Wait()
		s.topImage().hooks = nil
		if err, ok := probeErr.Load().(error); ok {
			t.Fatalf("probe write: %v", err)
		}
		t.Logf("%d of %d probe writes finished while clusters moved", during.Load(), len(probeOffsets))
		for _, off := range probeOffsets {
			copy(model[off:], "probe...")
		}
		got := make([]byte, len(model))
		if _, err := s.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("%d clusters: %s", clusters, firstDiff(got, model))
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		qemuCheckTop(t, dir)
	}
}

// TestCloneFromServedStack clones a snapshot of a stack that is open and
// being written: the clone needs no lock on the source, shares its frozen
// deltas by hard link and reads what the snapshot froze.
func TestCloneFromServedStack(t *testing.T) {
	const size = 4 << 20
	dir := filepath.Join(t.TempDir(), "vol")
	if err := InitStack(dir, InitOptions{Size: size, ClusterSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	s := mustOpenStack(t, dir, StackOptions{})
	defer s.Close()
	m := &onlineModel{blocks: make([][]blockVersion, size/onlineBlock)}
	stop := make(chan struct{})
	progress := make(chan struct{})
	var phase atomic.Int64
	wg := onlineWriters(t, s, m, 4, &phase, 1, stop, progress)
	defer func() { close(stop); wg.Wait() }()
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
	from := time.Now()
	guid, _, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	to := time.Now()
	waitWrites()
	clone := filepath.Join(t.TempDir(), "clone")
	if err := Clone(dir, guid, clone); err != nil {
		t.Fatalf("clone of a served stack: %v", err)
	}
	waitWrites()
	m.checkView(t, "clone", readStack(t, clone, ""), from, to)
	shots, err := ListSnapshots(clone)
	if err != nil {
		t.Fatal(err)
	}
	for _, sh := range shots[:len(shots)-1] {
		if sh.Links != 2 {
			t.Errorf("clone delta %s has %d links, want 2 (shared, not copied)", sh.File, sh.Links)
		}
	}
	if top := shots[len(shots)-1]; top.Links != 1 {
		t.Errorf("clone top %s has %d links", top.File, top.Links)
	}
	// The source's lock is still held: an offline operation is refused.
	if _, err := Snapshot(dir); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Errorf("offline snapshot of the served source: %v, want EWOULDBLOCK", err)
	}
}
