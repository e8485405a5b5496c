package powerloss

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"golang.org/x/sys/unix"
)

// stackState is what the descriptor says: the chain of GUIDs (base first)
// and the virtual size.
type stackState struct {
	chain []string
	size  int64
}

func (s stackState) String() string {
	short := make([]string, len(s.chain))
	for i, g := range s.chain {
		short[i] = g[:min(len(g), 9)] + "…}"
	}
	return fmt.Sprintf("[%s] %d MiB", strings.Join(short, " "), s.size>>20)
}

func readState(dir string) (stackState, error) {
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return stackState{}, err
	}
	var st stackState
	for _, im := range d.Chain() {
		st.chain = append(st.chain, im.GUID)
	}
	st.size = d.Size()
	return st, nil
}

// stackOp is an online operation: its marks and the state after it.
type stackOp struct {
	name  string
	after stackState
}

// snapshotView is a snapshot's contents as read right after it was taken:
// per tracked block the write it holds (0: zeros).
type snapshotView struct {
	name string
	size int64
	tags []uint64
}

// testStack runs the writers against a served stack while online
// snapshots, merges (of the base into a middle delta and of a delta into
// the top), a relocating grow and a compaction run, and checks at every
// replay point that the stack and each snapshot are in their state before
// or after the operation and hold what the flushes guarantee. The base is
// filled and flushed first, so that after the first snapshot 4 KiB writes
// copy up clusters whose other blocks must keep the base's data.
func testStack(t *testing.T) {
	const size, cs = 4 << 20, 64 << 10
	const grownSize = 2 << 30 // the BAT outgrows its first cluster: data clusters move
	const clusters = size / cs
	const zoneStart = clusters * 3 / 4 // clusters from here on only get zeros
	const highStart = (1 << 30) / cs   // written after the grow
	sc := sizes()
	r := newRig(t, "stack", 96, 1536)
	dir := filepath.Join(r.mnt, "stack")
	if err := ploop.InitStack(dir, ploop.InitOptions{Size: size, ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	if err := syncDir(r.mnt); err != nil {
		t.Fatal(err)
	}
	st, err := ploop.OpenStack(dir, ploop.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// After a failure: let go of the mount (a second Close is harmless).
	t.Cleanup(func() { st.Close() })
	var blocks []int64
	for b := range int64(size / blockSize) {
		blocks = append(blocks, b)
	}
	per := int64(cs / blockSize)
	for b := highStart * per; b < (highStart+4)*per; b++ {
		blocks = append(blocks, b)
	}
	m := newModel(blocks)
	initial, err := readState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.mark(r.mark, "ready", nil); err != nil {
		t.Fatal(err)
	}
	s := serve(t, st, "powerloss-stack")
	wl := newWorkload(m, r, s.dev, cs)
	wl.discard = true
	var grown atomic.Bool
	wl.clusters = func(w int) []int64 {
		var cl []int64
		for c := int64(w); c < clusters; c += int64(wl.writers) {
			cl = append(cl, c)
		}
		if grown.Load() {
			cl = append(cl, highStart+int64(w))
		}
		return cl
	}
	wl.zeroOnly = func(c int64) bool { return c >= zoneStart && c < clusters }

	t0 := time.Now()
	// The base's data, flushed long before any copy-up.
	buf := alignedBuffer(cs)
	defer unix.Munmap(buf)
	for c := range int64(zoneStart) {
		if err := wl.put(buf, wl.blocksOf(c), kindData, "fill cluster"); err != nil {
			t.Fatal(err)
		}
	}
	if err := wl.flush(); err != nil {
		t.Fatal(err)
	}

	rn := wl.start(seed(t))
	var ops []stackOp
	snaps := map[string]*snapshotView{}
	var opErr error
	online := func(name string, op func() (string, error)) {
		if opErr != nil {
			return
		}
		ctx, cancel := rn.ctx(10 * time.Minute)
		defer cancel()
		if opErr = wl.waitFlushes(ctx, sc.gap); opErr != nil {
			return
		}
		doneBefore := m.completed()
		if opErr = m.mark(r.mark, name+"-start", nil); opErr != nil {
			return
		}
		t1 := time.Now()
		guid, err := op()
		if err != nil {
			opErr = fmt.Errorf("%s: %w", name, err)
			return
		}
		took := time.Since(t1)
		if opErr = m.mark(r.mark, name+"-done", nil); opErr != nil {
			return
		}
		after, err := readState(dir)
		if err != nil {
			opErr = err
			return
		}
		ops = append(ops, stackOp{name: name, after: after})
		t.Logf("%s took %v; stack now %v", name, took.Round(time.Millisecond), after)
		if guid != "" {
			v, err := readSnapshot(dir, guid, name, m)
			if err == nil {
				err = m.checkSnapshot(v, doneBefore, m.issued())
			}
			if err != nil {
				opErr = fmt.Errorf("%s: %w", name, err)
				return
			}
			snaps[guid] = v
		}
	}
	var g1, g2 string
	online("snapshot1", func() (string, error) {
		g, _, err := st.Snapshot()
		g1 = g
		return g, err
	})
	online("snapshot2", func() (string, error) {
		g, _, err := st.Snapshot()
		g2 = g
		return g, err
	})
	online("merge-base", func() (string, error) { _, err := st.DeleteSnapshot(g1); return "", err })
	online("grow", func() (string, error) {
		if _, err := st.Grow(grownSize); err != nil {
			return "", err
		}
		return "", s.att.Resize(grownSize)
	})
	grown.Store(true) // after grow-done: no earlier state holds these writes
	online("compact", func() (string, error) {
		res, _, err := st.Compact()
		t.Logf("compact: %+v", res)
		return "", err
	})
	online("merge-top", func() (string, error) { _, err := st.DeleteSnapshot(g2); return "", err })
	if opErr == nil {
		ctx, cancel := rn.ctx(10 * time.Minute)
		opErr = wl.waitFlushes(ctx, sc.gap)
		cancel()
	}
	if err := rn.stop(); err != nil {
		t.Fatal(err)
	}
	if opErr != nil {
		t.Fatal(opErr)
	}
	if err := wl.flush(); err != nil {
		t.Fatal(err)
	}
	s.disconnect(t)
	if got := s.disk.flushes.Load(); got < wl.flushes.Load() {
		t.Fatalf("the server saw %d flushes, the client sent %d", got, wl.flushes.Load())
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.mark(r.mark, "closed", nil); err != nil {
		t.Fatal(err)
	}
	t.Logf("workload: %s in %v", wl.summary(), time.Since(t0).Round(time.Millisecond))
	lg := r.finish()
	from, err := lg.Mark("ready")
	if err != nil {
		t.Fatal(err)
	}
	q := newQemuImgChecker(r)
	states := []stackState{initial}
	for _, op := range ops {
		states = append(states, op.after)
	}
	replayAndCheck(t, r, lg, choosePoints(lg, m, from, sc.between), func(ctx context.Context, p *point, mnt string) ([]string, []string) {
		return checkStack(ctx, m, q, p, filepath.Join(mnt, "stack"), ops, states, snaps, &r.timing)
	})
	t.Logf("qemu-img check ran %d times", q.runs)
}

// readSnapshot reads the snapshot guid of the stack in dir as the model
// sees it.
func readSnapshot(dir, guid, name string, m *model) (*snapshotView, error) {
	sv, err := ploop.OpenStack(dir, ploop.StackOptions{Snapshot: guid})
	if err != nil {
		return nil, err
	}
	defer sv.Close()
	v := &snapshotView{name: name, size: sv.Size(), tags: make([]uint64, len(m.blocks))}
	var bad error
	err = m.readTracked(sv.ReadAt, v.size, func(i int, p []byte) {
		c := decodeBlock(p, m.blocks[i])
		if c.garbage != "" && bad == nil {
			bad = fmt.Errorf("snapshot %s block %d holds %s", guid, m.blocks[i], c.garbage)
		}
		v.tags[i] = c.tag
	})
	if err != nil {
		return nil, fmt.Errorf("read snapshot %s: %w", guid, err)
	}
	if bad != nil {
		return nil, bad
	}
	return v, nil
}

// checkSnapshot checks a snapshot read right after it was taken: each
// block holds the last write completed before the snapshot started
// (doneBefore) or a later one issued before it ended (issuedAfter).
func (m *model) checkSnapshot(v *snapshotView, doneBefore, issuedAfter []int32) error {
	var bad []string
	for i, tag := range v.tags {
		if (m.blocks[i]+1)*blockSize > v.size {
			continue
		}
		h := m.hist[i]
		d := int(doneBefore[i])
		ok := tag == 0 && d < 0
		for _, w := range h.writes[max(d, 0):issuedAfter[i]] {
			ok = ok || (tag == 0 && w.zero()) || (tag != 0 && w.kind == kindData && w.tag == tag)
		}
		if !ok {
			bad = append(bad, fmt.Sprintf("block %d holds %v", m.blocks[i], blockContent{zero: tag == 0, tag: tag}))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("snapshot %s does not hold the data at the time it was taken: %s", v.name, strings.Join(bad[:min(len(bad), 8)], "; "))
	}
	return nil
}

// checkStack checks the stack in dir at point p.
func checkStack(ctx context.Context, m *model, q *qemuImgChecker, p *point, dir string, ops []stackOp, states []stackState, snaps map[string]*snapshotView, tm *phaseTimes) (probs, notes []string) {
	before, err := ploop.CheckStack(dir)
	if err != nil {
		return []string{fmt.Sprintf("ploop.CheckStack: %v", err)}, nil
	}
	for _, d := range before.Deltas {
		notes = append(notes, problemNotes("before repair "+filepath.Base(d.Path), d)...)
	}
	if len(before.Orphans) > 0 {
		notes = append(notes, "before repair: orphans")
	}
	if len(before.Unfinished) > 0 {
		notes = append(notes, "before repair: unfinished")
	}
	if p.ps.applied["closed"] && !cleanStack(before) {
		probs = append(probs, fmt.Sprintf("the stack was closed before this point, yet CheckStack reports: %s", strings.TrimSpace(before.String())))
	}
	if _, err := ploop.RepairStack(dir); err != nil {
		return append(probs, fmt.Sprintf("ploop.RepairStack: %v (before repair: %s)", err, strings.TrimSpace(before.String()))), notes
	}
	after, err := ploop.CheckStack(dir)
	if err != nil {
		return append(probs, fmt.Sprintf("ploop.CheckStack after RepairStack: %v", err)), notes
	}
	if !cleanStack(after) {
		probs = append(probs, fmt.Sprintf("ploop.CheckStack after RepairStack: %s", strings.TrimSpace(after.String())))
	}

	// The state: that after the last operation whose done mark is in the
	// log, or after the one that started and had not finished.
	done, started := 0, 0
	for _, op := range ops {
		if p.ps.applied[op.name+"-done"] {
			done++
		}
		if p.ps.applied[op.name+"-start"] {
			started++
		}
	}
	got, err := readState(dir)
	if err != nil {
		return append(probs, err.Error()), notes
	}
	sv, err := ploop.OpenStack(dir, ploop.StackOptions{ReadOnly: true})
	if err != nil {
		return append(probs, fmt.Sprintf("open the repaired stack: %v", err)), notes
	}
	defer sv.Close()
	got.size = sv.Size()
	legal := false
	for _, s := range states[done : started+1] {
		legal = legal || (slices.Equal(s.chain, got.chain) && s.size == got.size)
	}
	if !legal {
		want := make([]string, 0, 2)
		for _, s := range states[done : started+1] {
			want = append(want, s.String())
		}
		probs = append(probs, fmt.Sprintf("stack is %v, want %s", got, strings.Join(want, " or ")))
	}
	if started > done {
		notes = append(notes, fmt.Sprintf("during %s: %s", ops[done].name, map[bool]string{true: "after", false: "before"}[slices.Equal(got.chain, states[started].chain) && got.size == states[started].size]))
	}

	maps, err := sv.Map()
	if err != nil {
		return append(probs, err.Error()), notes
	}
	where := func(block int64) string {
		c := block * blockSize / sv.ClusterSize()
		from := "no delta"
		for _, mp := range maps {
			if off := c * sv.ClusterSize(); off >= mp.Offset && off < mp.Offset+mp.Length {
				from = "delta " + mp.File
			}
		}
		var pre []string
		for _, d := range before.Deltas {
			if s := entryProblems(d, c); s != "" {
				pre = append(pre, filepath.Base(d.Path)+s)
			}
		}
		return fmt.Sprintf(" [cluster %d read from %s after repair%s]", c, from, strings.Join(pre, ""))
	}
	t0 := time.Now()
	dp, _ := m.verify(sv.ReadAt, sv.Size(), p.ps, 8, where)
	probs = append(probs, dp...)
	probs = append(probs, unexpectedData(sv, maps, m)...)
	for _, guid := range got.chain[:len(got.chain)-1] {
		want, ok := snaps[guid]
		if !ok {
			probs = append(probs, fmt.Sprintf("the chain holds %s, which no snapshot returned", guid))
			continue
		}
		probs = append(probs, compareSnapshot(dir, guid, want, m)...)
	}
	tm.add("verify data", t0)
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return append(probs, err.Error()), notes
	}
	for _, im := range d.Chain() {
		if im.Type == ploop.TypeCompressed {
			if err := q.check(ctx, filepath.Join(dir, im.File)); err != nil {
				probs = append(probs, err.Error())
			}
		}
	}
	if len(probs) > 0 {
		where := "before the first operation"
		switch {
		case started > done:
			where = "during " + ops[done].name
		case done > 0:
			where = "after " + ops[done-1].name
		}
		files := make([]string, 0, len(d.Chain()))
		for _, im := range d.Chain() {
			files = append(files, im.File)
		}
		probs = append([]string{fmt.Sprintf("%s; after RepairStack the stack is %v, deltas %v", where, got, files)}, probs...)
	}
	return probs, notes
}

func cleanStack(r *ploop.StackReport) bool {
	for _, d := range r.Deltas {
		if len(d.Problems) != 0 {
			return false
		}
	}
	return len(r.Orphans) == 0 && len(r.Unfinished) == 0
}

// compareSnapshot checks that the snapshot guid reads exactly as when it
// was taken.
func compareSnapshot(dir, guid string, want *snapshotView, m *model) []string {
	sv, err := ploop.OpenStack(dir, ploop.StackOptions{Snapshot: guid})
	if err != nil {
		return []string{fmt.Sprintf("open %s: %v", want.name, err)}
	}
	defer sv.Close()
	if sv.Size() != want.size {
		return []string{fmt.Sprintf("%s is %d bytes, was %d", want.name, sv.Size(), want.size)}
	}
	maps, _ := sv.Map()
	var probs []string
	bad := 0
	err = m.readTracked(sv.ReadAt, want.size, func(i int, p []byte) {
		b := m.blocks[i]
		got := decodeBlock(p, b)
		if got.garbage == "" && got.tag == want.tags[i] {
			return
		}
		bad++
		if len(probs) < 8 {
			c := b * blockSize / sv.ClusterSize()
			from := "no delta"
			for _, mp := range maps {
				if off := c * sv.ClusterSize(); off >= mp.Offset && off < mp.Offset+mp.Length {
					from = "delta " + mp.File
				}
			}
			probs = append(probs, fmt.Sprintf("%s block %d (byte %d): got %v, was %v when taken [cluster %d read from %s]",
				want.name, b, b*blockSize, got, blockContent{zero: want.tags[i] == 0, tag: want.tags[i]}, c, from))
		}
	})
	if err != nil {
		probs = append(probs, fmt.Sprintf("read %s: %v", want.name, err))
	}
	if bad > len(probs) {
		probs = append(probs, fmt.Sprintf("… %s: %d blocks differ in all", want.name, bad))
	}
	return probs
}

// unexpectedData reads every allocated cluster of the view that holds no
// tracked block: nothing was ever written there, so it must read zeros.
func unexpectedData(sv *ploop.Stack, maps []ploop.StackMapping, m *model) []string {
	var probs []string
	p := make([]byte, blockSize)
	for _, mp := range maps {
		for off := mp.Offset; off < mp.Offset+mp.Length; off += blockSize {
			if _, tracked := m.index[off/blockSize]; tracked {
				continue
			}
			if _, err := sv.ReadAt(p, off); err != nil {
				return append(probs, fmt.Sprintf("read untracked byte %d: %v", off, err))
			}
			if !allZero(p) {
				probs = append(probs, fmt.Sprintf("byte %d, never written, holds %v (delta %s)", off, decodeBlock(p, off/blockSize), mp.File))
				if len(probs) == 4 {
					return probs
				}
			}
		}
	}
	return probs
}
