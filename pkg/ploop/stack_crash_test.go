package ploop

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The stack crash test: a child process (this test binary re-executed)
// runs one stack operation and SIGKILLs itself at its Nth step (each
// cluster copied by a merge, the flush, the descriptor's temporary write and
// rename, each delta removal, ...). The parent repairs the directory and
// checks that the volume and each snapshot equal the state before or the
// state after the operation, nothing in between.

const stackCrashEnv = "PLOOP_STACK_CRASH_CHILD"

// stackCrashOps are the operations under test; arg selects the snapshot.
var stackCrashOps = []string{"delete-lower", "delete-upper", "flatten", "snapshot", "clone", "grow", "grow-relocate", "compact"}

// runStackOp runs op on dir with the given hooks.
func runStackOp(op, dir string, snaps []string, h *hooks) error {
	switch op {
	case "delete-lower":
		return deleteSnapshot(dir, snaps[0], h)
	case "delete-upper":
		return deleteSnapshot(dir, snaps[1], h)
	case "flatten":
		// Share the two lowest deltas with another directory, as a clone
		// would, so that flatten has them to fold.
		d, err := ReadDescriptor(dir)
		if err != nil {
			return err
		}
		share := dir + "-share"
		if err := os.Mkdir(share, 0o700); err != nil {
			return err
		}
		for _, im := range d.Chain()[:2] {
			if err := os.Link(filepath.Join(dir, im.File), filepath.Join(share, im.File)); err != nil {
				return err
			}
		}
		return flatten(dir, h)
	case "snapshot":
		_, err := snapshot(dir, h)
		return err
	case "clone":
		return cloneStack(dir, snaps[1], dir+"-clone", h)
	case "grow":
		return growStack(dir, stackSize+5*stackCluster+512, h)
	case "grow-relocate":
		// Past one 32 KiB BAT cluster (8176 entries): the BAT takes three
		// clusters and the two first data clusters move.
		return growStack(dir, 600<<20, h)
	case "compact":
		if err := prepareCompaction(dir); err != nil {
			return err
		}
		_, err := compactStack(dir, h)
		return err
	}
	return fmt.Errorf("unknown op %q", op)
}

// TestStackCrashChild is the child side; it does nothing unless re-executed
// by TestStackCrash.
func TestStackCrashChild(t *testing.T) {
	spec := os.Getenv(stackCrashEnv)
	if spec == "" {
		return
	}
	f := strings.Split(spec, ",")
	op, dir, killAt := f[0], f[1], f[2]
	n, _ := strconv.Atoi(killAt)
	count := 0
	h := &hooks{fn: func(string) {
		count++
		if count == n {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	}}
	// Tell a parent that kills at a random time that the op starts now.
	os.Stdout.WriteString("start\n")
	if err := runStackOp(op, dir, f[3:], h); err != nil {
		t.Fatal(err)
	}
}

// crashState is what a stack reads as: the volume and each snapshot, as
// digests of their contents (a grown volume is 600 MiB; hundreds of
// states are compared).
type crashState struct {
	volume [sha256.Size]byte
	snaps  map[string][sha256.Size]byte
}

func readState(t *testing.T, dir string) crashState {
	t.Helper()
	st := crashState{volume: hashStack(t, dir, ""), snaps: map[string][sha256.Size]byte{}}
	list, err := ListSnapshots(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, si := range list[:len(list)-1] {
		st.snaps[si.GUID] = hashStack(t, dir, si.GUID)
	}
	return st
}

// hashStack digests the whole disk of dir, or of snapshot guid, reading
// it in pieces.
func hashStack(t *testing.T, dir, guid string) [sha256.Size]byte {
	t.Helper()
	s := mustOpenStack(t, dir, StackOptions{ReadOnly: true, Snapshot: guid})
	defer s.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < s.Size(); off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), s.Size()-off)]
		if _, err := s.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		h.Write(p)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

func (s crashState) equal(o crashState) bool {
	if s.volume != o.volume || len(s.snaps) != len(o.snaps) {
		return false
	}
	for g, d := range s.snaps {
		if d != o.snaps[g] {
			return false
		}
	}
	return true
}

// copyDir copies the regular files of src into a new directory dst.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.Mkdir(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		in, err := os.Open(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(dst, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			t.Fatal(err)
		}
		in.Close()
		out.Close()
	}
}

// crashTemplate builds base -> S1 -> S2 -> top, each delta with its own
// writes and overwrites of the ones below.
func crashTemplate(t *testing.T, dir string, raw bool) []string {
	rng := rand.New(rand.NewPCG(9, 9))
	mustInit(t, dir, raw)
	var snaps []string
	for layer := range 3 {
		writeStack(t, dir, func(s *Stack) {
			for range 12 {
				off := rng.Int64N(stackSize)
				n := min(rng.Int64N(3*stackCluster)+1, stackSize-off)
				if rng.IntN(5) == 0 {
					s.Discard(off, n)
				} else {
					s.WriteAt(randomBytes(rng, int(n)), off)
				}
			}
		})
		if layer < 2 {
			g, err := Snapshot(dir)
			if err != nil {
				t.Fatal(err)
			}
			snaps = append(snaps, g)
		}
	}
	return snaps
}

func TestStackCrash(t *testing.T) {
	runs := 600
	if testing.Short() {
		runs = 120
	}
	if s := os.Getenv("PLOOP_STACK_CRASH_RUNS"); s != "" {
		runs, _ = strconv.Atoi(s)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	rng := rand.New(rand.NewPCG(uint64(os.Getpid()), 1))
	type prepared struct {
		dir           string
		snaps         []string
		before, after crashState
		points        int
		took          time.Duration
	}
	// For each template and op: the states before and after, and how
	// many hook points the op passes.
	preps := map[string]*prepared{}
	for _, raw := range []bool{false, true} {
		tmpl := filepath.Join(root, fmt.Sprint("tmpl-raw-", raw))
		snaps := crashTemplate(t, tmpl, raw)
		before := readState(t, tmpl)
		for _, op := range stackCrashOps {
			// PLOOP_STACK_CRASH_OPS=compact,grow-relocate runs only those.
			if only := os.Getenv("PLOOP_STACK_CRASH_OPS"); only != "" && !slices.Contains(strings.Split(only, ","), op) {
				continue
			}
			work := filepath.Join(root, fmt.Sprintf("count-%v-%s", raw, op))
			copyDir(t, tmpl, work)
			points := 0
			start := time.Now()
			if err := runStackOp(op, work, snaps, &hooks{fn: func(string) { points++ }}); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			after := readState(t, work)
			if op == "snapshot" {
				// The new snapshot's GUID is random: compare contents only.
				after.snaps = nil
			}
			preps[fmt.Sprint(raw, op)] = &prepared{tmpl, snaps, before, after, points, took}
			t.Logf("raw base %v, %s: %d hook points, %v", raw, op, points, took)
		}
	}
	keys := make([]string, 0, len(preps))
	for k := range preps {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	outcomes := map[string]int{}
	for i := range runs {
		key := keys[i%len(keys)]
		p := preps[key]
		op := strings.TrimPrefix(strings.TrimPrefix(key, "true"), "false")
		// Two runs in three kill at a hook point between steps; the third
		// kills from outside after a random delay, which can land inside
		// a step (between a cluster's data and its BAT entry, inside
		// Flush, ...); that child may also finish first.
		killAt := rng.IntN(p.points) + 1
		timed := i%3 == 2
		if timed {
			killAt = 0
		}
		work := filepath.Join(root, fmt.Sprint("run", i))
		copyDir(t, p.dir, work)
		cmd := exec.Command(exe, "-test.run=^TestStackCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), stackCrashEnv+"="+strings.Join(append([]string{op, work, strconv.Itoa(killAt)}, p.snaps...), ","))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(stdout)
		line, _ := br.ReadString('\n')
		if line != "start\n" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("%s: child did not start: %q\n%s", key, line, stderr.String())
		}
		timer := time.AfterFunc(time.Duration(rng.Int64N(int64(p.took)+1)), func() {
			if timed {
				cmd.Process.Signal(syscall.SIGKILL)
			}
		})
		rest, _ := io.ReadAll(br)
		err = cmd.Wait()
		timer.Stop()
		ee, ok := err.(*exec.ExitError)
		killed := ok && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL
		switch {
		case timed && err == nil:
			outcomes["timed kill came after the end"]++
		case timed && killed:
			outcomes["timed kill"]++
		case !killed:
			t.Fatalf("%s: child was not killed at point %d of %d: %v\n%s%s", key, killAt, p.points, err, rest, stderr.String())
		}
		rep, err := RepairStack(work)
		if err != nil {
			t.Fatalf("%s killed at %d: repair: %v", key, killAt, err)
		}
		if rep, err := CheckStack(work); err != nil || !rep.Clean() {
			t.Fatalf("%s killed at %d: not clean after repair: %v %v", key, killAt, err, rep)
		}
		if op == "compact" || op == "grow-relocate" {
			qemuCheckTop(t, work)
		}
		got := readState(t, work)
		if op == "clone" {
			// The source never changes; the clone exists completely or
			// not at all.
			if !got.equal(p.before) {
				t.Fatalf("clone killed at %d changed the source", killAt)
			}
			if _, err := os.Stat(work + "-clone"); err == nil {
				if hashStack(t, work+"-clone", "") != p.before.snaps[p.snaps[1]] {
					t.Fatalf("clone killed at %d: partial clone", killAt)
				}
				outcomes[key+" after"]++
			} else {
				outcomes[key+" before"]++
			}
			continue
		}
		switch {
		case got.equal(p.before):
			outcomes[key+" before"]++
		case op == "snapshot" && got.volume == p.before.volume && len(got.snaps) == len(p.before.snaps)+1:
			outcomes[key+" after"]++
		case got.equal(p.after):
			outcomes[key+" after"]++
		default:
			t.Fatalf("%s killed at point %d of %d (repair: %v): the stack is neither in the state before nor after", key, killAt, p.points, rep)
		}
		// The repaired stack is usable for writing.
		writeStack(t, work, func(s *Stack) { s.WriteAt([]byte("ok"), 0) })
		os.RemoveAll(work)
	}
	t.Logf("%d kills: %v", runs, outcomes)
}
