package catalog

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// stackOnline is the Online of a process that serves open stacks: the
// real online operations of pkg/ploop, as the node's attachments will call
// them.
type stackOnline struct {
	mu     sync.Mutex
	stacks map[string]*ploop.Stack
	calls  map[string]int
}

func newStackOnline() *stackOnline {
	return &stackOnline{stacks: map[string]*ploop.Stack{}, calls: map[string]int{}}
}

// attach opens a volume's stack for writing, as serving it would.
func (o *stackOnline) attach(t testing.TB, c *Catalog, id string) *ploop.Stack {
	t.Helper()
	dir, err := c.VolumePath(id)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ploop.OpenStack(dir, ploop.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	o.stacks[id] = s
	o.mu.Unlock()
	return s
}

func (o *stackOnline) detach(t testing.TB, id string) {
	t.Helper()
	o.mu.Lock()
	s := o.stacks[id]
	delete(o.stacks, id)
	o.mu.Unlock()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func (o *stackOnline) get(op, id string) (*ploop.Stack, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.stacks[id]
	if s == nil {
		return nil, fmt.Errorf("%s: %w", id, ErrNotAttached)
	}
	o.calls[op]++
	return s, nil
}

func (o *stackOnline) count(op string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.calls[op]
}

func (o *stackOnline) Attached(ctx context.Context, id string) (bool, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.stacks[id] != nil, nil
}

func (o *stackOnline) Snapshot(ctx context.Context, id string) (string, error) {
	s, err := o.get("snapshot", id)
	if err != nil {
		return "", err
	}
	g, _, err := s.Snapshot()
	return g, err
}

func (o *stackOnline) DeleteSnapshot(ctx context.Context, id, guid string) error {
	s, err := o.get("merge", id)
	if err != nil {
		return err
	}
	_, err = s.DeleteSnapshot(guid)
	return err
}

func (o *stackOnline) Grow(ctx context.Context, id string, size int64) error {
	s, err := o.get("grow", id)
	if err != nil {
		return err
	}
	_, err = s.Grow(size)
	return err
}

func (o *stackOnline) Compact(ctx context.Context, id string) error {
	s, err := o.get("compact", id)
	if err != nil {
		return err
	}
	_, _, err = s.Compact()
	return err
}

// blockWriter writes versioned 4 KiB blocks to a served stack until
// stopped; each block's history is kept so that a snapshot taken during
// [from, to] can be checked: every block must hold a version written no
// earlier than the last one completed before from and no later than the
// last one started before to.
type blockWriter struct {
	mu     sync.Mutex
	blocks int
	hist   [][]blockWrite
}

type blockWrite struct {
	version    uint64
	start, end time.Time
}

const wblock = 4096

func blockData(block int, version uint64) []byte {
	b := make([]byte, wblock)
	if version == 0 {
		return b
	}
	for i := 0; i < wblock; i += 16 {
		binary.LittleEndian.PutUint64(b[i:], uint64(block)+1)
		binary.LittleEndian.PutUint64(b[i+8:], version)
	}
	return b
}

func (w *blockWriter) run(t *testing.T, s *ploop.Stack, stop <-chan struct{}, progress *atomic.Int64) *sync.WaitGroup {
	var wg sync.WaitGroup
	const writers = 3
	for k := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := uint64(1); ; n++ {
				for b := k; b < w.blocks; b += writers {
					select {
					case <-stop:
						return
					default:
					}
					start := time.Now()
					if _, err := s.WriteAt(blockData(b, n), int64(b)*wblock*17); err != nil {
						t.Errorf("write: %v", err)
						return
					}
					end := time.Now()
					w.mu.Lock()
					w.hist[b] = append(w.hist[b], blockWrite{n, start, end})
					w.mu.Unlock()
					progress.Add(1)
				}
			}
		}()
	}
	return &wg
}

// check asserts that data (a whole volume) is a consistent point in
// [from, to].
func (w *blockWriter) check(t *testing.T, what string, data []byte, from, to time.Time) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	for b := range w.blocks {
		off := int64(b) * wblock * 17
		got := data[off : off+wblock]
		v := binary.LittleEndian.Uint64(got[8:])
		if string(got) != string(blockData(b, v)) {
			t.Fatalf("%s: block %d is torn or foreign", what, b)
		}
		var lo, hi uint64
		for _, h := range w.hist[b] {
			if h.end.Before(from) {
				lo = h.version
			}
			if h.start.Before(to) {
				hi = h.version
			}
		}
		if v < lo || v > hi {
			t.Fatalf("%s: block %d holds version %d, want one in [%d, %d]", what, b, v, lo, hi)
		}
	}
}

// waitFor waits until the writers made n more writes.
func waitFor(t *testing.T, progress *atomic.Int64, n int64) {
	t.Helper()
	want := progress.Load() + n
	testcmd.WaitFor(t, time.Minute, "the writers' progress", func() (bool, error) { return progress.Load() >= want, nil })
}

// TestOnlineSnapshotWhileWriting: with a volume open and written by the
// process serving it, the catalogue snapshots it online (not offline: the
// stack is locked), the snapshot restores a consistent point of the
// writes, and expansion, merges and deletion of the attached volume go
// through the serving process or are refused.
func TestOnlineSnapshotWhileWriting(t *testing.T) {
	on := newStackOnline()
	c := newFastCatalog(t, Options{Online: on})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 32 * mib, ClusterSize: 64 << 10})
	s := on.attach(t, c, v.ID)
	w := &blockWriter{blocks: 400, hist: make([][]blockWrite, 400)}
	stop := make(chan struct{})
	var progress atomic.Int64
	wg := w.run(t, s, stop, &progress)
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			wg.Wait()
		}
	}()

	type taken struct {
		snap     Snapshot
		from, to time.Time
	}
	var snaps []taken
	for i := range 3 {
		waitFor(t, &progress, 500)
		from := time.Now()
		sn, err := c.CreateSnapshot(ctx, fmt.Sprint("s", i), v.ID)
		to := time.Now()
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, taken{sn, from, to})
	}
	waitFor(t, &progress, 500)
	// A clone of the attached volume goes through an online snapshot too.
	from := time.Now()
	cl, err := c.CreateVolume(ctx, VolumeRequest{Name: "clone", SourceVolume: v.ID})
	to := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	// Online expansion while writing.
	if size, node, err := c.ExpandVolume(ctx, v.ID, 48*mib, 0); err != nil || size != 48*mib || !node {
		t.Fatalf("online expansion: %d %v %v", size, node, err)
	}
	if s.Size() != 48*mib {
		t.Fatalf("served stack is %d bytes after expansion", s.Size())
	}
	// Deleting a snapshot merges its delta in the served stack.
	waitFor(t, &progress, 500)
	if err := c.DeleteSnapshot(ctx, snaps[1].snap.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.Compact(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVolume(ctx, v.ID); !errors.Is(err, ErrInUse) {
		t.Fatalf("delete of an attached volume: %v", err)
	}
	if cond, err := c.Condition(ctx, v.ID); err != nil || cond.Abnormal {
		t.Fatalf("condition of the attached volume: %+v, %v", cond, err)
	}
	close(stop)
	wg.Wait()
	stopped = true
	for _, op := range []string{"snapshot", "grow", "merge", "compact"} {
		if on.count(op) == 0 {
			t.Errorf("no online %s", op)
		}
	}
	if depth := s.Depth(); depth != 4 {
		// base, s0, the clone's delta, s2... minus the merged s1, plus the top
		t.Errorf("served depth %d, want 4", depth)
	}
	final := make([]byte, s.Size())
	if _, err := s.ReadAt(final, 0); err != nil {
		t.Fatal(err)
	}
	on.detach(t, v.ID)
	equalData(t, "volume after detach", readVolume(t, c.stackDir(v.ID)), final)
	qemuCheckStack(t, c.stackDir(v.ID))

	for _, sn := range []taken{snaps[0], snaps[2]} {
		r := mustCreate(t, c, VolumeRequest{Name: "r-" + sn.snap.Name, SourceSnapshot: sn.snap.ID})
		w.check(t, "snapshot "+sn.snap.Name, readVolume(t, c.stackDir(r.ID)), sn.from, sn.to)
		qemuCheckStack(t, c.snapDir(sn.snap.ID))
	}
	w.check(t, "clone", readVolume(t, c.stackDir(cl.ID)), from, to)
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatalf("delete after detach: %v", err)
	}
	checkConsistent(t, c)
}

// fakeOnline answers every call with err, counting them: it checks the
// catalogue's dispatch, not any stack.
type fakeOnline struct {
	err      error
	attached bool
	calls    atomic.Int64
}

func (f *fakeOnline) Attached(context.Context, string) (bool, error) {
	f.calls.Add(1)
	return f.attached, nil
}
func (f *fakeOnline) Snapshot(context.Context, string) (string, error) {
	f.calls.Add(1)
	return "", f.err
}
func (f *fakeOnline) DeleteSnapshot(context.Context, string, string) error {
	f.calls.Add(1)
	return f.err
}
func (f *fakeOnline) Grow(context.Context, string, int64) error { f.calls.Add(1); return f.err }
func (f *fakeOnline) Compact(context.Context, string) error     { f.calls.Add(1); return f.err }

// TestOnlineDispatch: ErrNotAttached sends an operation offline; any other
// error from the serving side is returned and nothing runs offline; a stack
// locked by a process the catalogue cannot reach is ErrInUse.
func TestOnlineDispatch(t *testing.T) {
	down := errors.New("node unreachable")
	f := &fakeOnline{err: fmt.Errorf("%w: %w", down, ErrUnavailable)}
	c, _ := newCatalog(t, Options{Online: f})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 4 * mib})
	dir := c.stackDir(v.ID)
	before := treeHash(t, dir)
	_, err := c.CreateSnapshot(ctx, "s", v.ID)
	wantErr(t, err, down, "snapshot with the node down")
	wantErr(t, err, ErrUnavailable, "snapshot with the node down")
	_, _, err = c.ExpandVolume(ctx, v.ID, 8*mib, 0)
	wantErr(t, err, down, "expansion with the node down")
	wantErr(t, c.Compact(ctx, v.ID), down, "compact with the node down")
	if treeHash(t, dir) != before {
		t.Fatal("an operation ran offline although the node may serve the volume")
	}
	if got, _ := c.GetVolume(ctx, v.ID); got.Size != 4*mib {
		t.Fatalf("size %d after a failed expansion", got.Size)
	}
	if l, _, _ := c.ListSnapshots(ctx, SnapshotFilter{}, "", 0); len(l) != 0 {
		t.Fatalf("a failed snapshot is listed: %v", l)
	}
	f.attached = true
	wantErr(t, c.DeleteVolume(ctx, v.ID), ErrInUse, "delete of an attached volume")
	f.attached = false

	f.err = ErrNotAttached
	s := mustSnapshot(t, c, "s", v.ID)
	if _, _, err := c.ExpandVolume(ctx, v.ID, 8*mib, 0); err != nil {
		t.Fatal(err)
	}
	if depth(t, dir) != 2 {
		t.Fatalf("offline snapshot: depth %d", depth(t, dir))
	}

	// A process outside our Online holds the stack (ploopctl serve, say).
	held, err := ploop.OpenStack(dir, ploop.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.CreateSnapshot(ctx, "s2", v.ID)
	wantErr(t, err, ErrInUse, "snapshot of a stack another process holds")
	wantErr(t, c.DeleteVolume(ctx, v.ID), ErrInUse, "delete of a stack another process holds")
	if err := held.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteSnapshot(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if depth(t, dir) != 1 {
		t.Fatalf("offline merge: depth %d", depth(t, dir))
	}
	checkConsistent(t, c)
}
