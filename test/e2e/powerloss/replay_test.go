package powerloss

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/logwrites"
)

// point is a place in the log to replay to: the first n entries applied.
type point struct {
	n     int
	label string
	mark  bool
	ps    pointState
	// stateErr says the log's marks contradict the model.
	stateErr error
}

// choosePoints returns a point at every mark from entry from on (the
// workload's first mark) and between more points spread evenly over the
// other entries after it, in log order.
func choosePoints(lg *logwrites.Log, m *model, from, between int) []point {
	var pts []point
	var others []int
	for i := from; i < len(lg.Entries); i++ {
		if lg.Entries[i].Flags&logwrites.FlagMark != 0 {
			pts = append(pts, point{n: i + 1, mark: true, label: fmt.Sprintf("mark %s (entry %d)", lg.Entries[i].Mark, i)})
		} else {
			others = append(others, i)
		}
	}
	between = min(between, len(others))
	for k := range between {
		i := others[k*len(others)/between]
		pts = append(pts, point{n: i + 1})
	}
	slices.SortFunc(pts, func(a, b point) int { return a.n - b.n })
	var applied []string
	last, lastIdx := "the start", 0
	next := 0
	for i := range pts {
		for ; next < pts[i].n; next++ {
			if e := lg.Entries[next]; e.Flags&logwrites.FlagMark != 0 {
				applied = append(applied, e.Mark)
				last, lastIdx = e.Mark, next
			}
		}
		if !pts[i].mark {
			e := lg.Entries[pts[i].n-1]
			pts[i].label = fmt.Sprintf("entry %d (%v), %d after mark %s", pts[i].n-1, e, pts[i].n-1-lastIdx, last)
		}
		pts[i].ps, pts[i].stateErr = m.stateAt(applied)
	}
	return pts
}

// checkFunc checks the replayed file system, mounted at mnt, at point p.
// It returns problems (the test fails) and notes (counted for the report).
type checkFunc func(ctx context.Context, p *point, mnt string) (problems, notes []string)

// replayAndCheck replays the log onto a copy of the rig's initial file
// system up to each point in turn and checks a private copy of the result
// (fsck, then check). Two checks run at a time, one per guest CPU.
func replayAndCheck(t *testing.T, r *rig, lg *logwrites.Log, pts []point, check checkFunc) {
	t.Helper()
	t0 := time.Now()
	replay := filepath.Join(r.dir, "replay.img")
	if err := copySparse(replay, r.baseFile); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(replay, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rp := lg.NewReplayer(f, r.fsBytes)

	// A slot is a mount point; each point gets a fresh copy of the file
	// system, so that nothing left of an earlier check can touch it.
	const workers = 2
	free := make(chan string, workers)
	for k := range workers {
		mnt := filepath.Join(r.dir, fmt.Sprintf("mnt%d", k))
		if err := os.Mkdir(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		free <- mnt
	}
	type result struct{ problems, notes []string }
	results := make([]result, len(pts))
	var wg sync.WaitGroup
	for i := range pts {
		tp := time.Now()
		if err := rp.ReplayTo(pts[i].n); err != nil {
			t.Fatal(err)
		}
		r.timing.add("replay", tp)
		mnt := <-free
		tp = time.Now()
		img := filepath.Join(r.dir, fmt.Sprintf("point%d.img", i))
		if err := copySparse(img, replay); err != nil {
			t.Fatal(err)
		}
		r.timing.add("copy", tp)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { free <- mnt }()
			defer os.Remove(img)
			p := &pts[i]
			if p.stateErr != nil {
				results[i].problems = []string{p.stateErr.Error()}
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			var notes []string
			results[i].problems = r.fsckAndMount(ctx, img, mnt, func() []string {
				tc := time.Now()
				defer r.timing.add("ploop checks", tc)
				probs, n := check(ctx, p, mnt)
				notes = n
				return probs
			})
			results[i].notes = notes
		}()
	}
	wg.Wait()

	// Everything replayed must give the device's final contents: the log
	// is complete and the replayer writes what the kernel logged.
	if err := rp.ReplayTo(len(lg.Entries)); err != nil {
		t.Fatal(err)
	}
	if err := sameContents(replay, r.dataFile); err != nil {
		t.Fatalf("replaying the whole log does not give the final file system: %v", err)
	}

	failed, first := 0, ""
	marks := 0
	notes := map[string]int{}
	for i, res := range results {
		if pts[i].mark {
			marks++
		}
		for _, n := range res.notes {
			notes[n]++
		}
		if len(res.problems) == 0 {
			continue
		}
		failed++
		if first == "" {
			first = fmt.Sprintf("%s: %s", pts[i].label, strings.Join(res.problems, " | "))
		}
		t.Errorf("replayed to %s: %d problem(s):\n\t%s", pts[i].label, len(res.problems), strings.Join(res.problems, "\n\t"))
	}
	var ns []string
	for n, c := range notes {
		ns = append(ns, fmt.Sprintf("%s: %d", n, c))
	}
	slices.Sort(ns)
	t.Logf("log: %d entries, %d MiB; checked %d replay points (%d marks, %d between marks) in %v (summed over %d workers: %v); %d failed; notes (points): %s",
		len(lg.Entries), logBytes(lg)>>20, len(pts), marks, len(pts)-marks, time.Since(t0).Round(time.Second), workers, &r.timing, failed, strings.Join(ns, "; "))
	if failed > 0 {
		// Last, on one line: a CI log that keeps only its tail shows this.
		t.Errorf("%d of %d replay points failed; the first at %s", failed, len(pts), strings.ReplaceAll(first, "\n", " | "))
	}
}

func logBytes(lg *logwrites.Log) int64 {
	n := int64(0)
	for _, e := range lg.Entries {
		n += lg.SectorSize
		if e.Flags&logwrites.FlagDiscard == 0 {
			n += e.Length(lg.SectorSize)
		}
	}
	return n
}

func sameContents(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; off += int64(len(ba)) {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			for i := range min(na, nb) {
				if ba[i] != bb[i] {
					return fmt.Errorf("%s and %s differ at byte %d", a, b, off+int64(i))
				}
			}
			return fmt.Errorf("%s and %s differ in length near byte %d", a, b, off+int64(min(na, nb)))
		}
		if ea == io.EOF || ea == io.ErrUnexpectedEOF {
			if eb != ea {
				return fmt.Errorf("%s and %s differ in length", a, b)
			}
			return nil
		}
		if ea != nil {
			return ea
		}
		if eb != nil {
			return eb
		}
	}
}
