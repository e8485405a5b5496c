package ploop

import (
	"bufio"
	"bytes"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The crash test: a child process (this test binary re-executed) writes,
// discards and flushes in a loop and acknowledges each completed Flush over
// a pipe. The parent SIGKILLs it after a random number of
// acknowledgements, repairs the image, and checks that it is clean and
// holds every write acknowledged before the kill.

const (
	crashChildEnv = "PLOOP_CRASH_CHILD"
	crashSize     = 16 << 20
	crashCluster  = 32 << 10
	// crashMaxBatch bounds the operations between two flushes.
	crashMaxBatch = 12
)

type crashOp struct {
	discard bool // Discard, or WriteZeroes when zero is set
	zero    bool
	off     int64
	data    []byte // nil for a discard; len is the length
	length  int64
}

// crashOps generates the child's operations; the parent regenerates the
// same sequence from the seed. Each flush batch size comes from the same
// stream, so both sides agree on where flushes fall.
type crashOps struct {
	rng *rand.Rand
}

func newCrashOps(seed uint64) *crashOps { return &crashOps{rand.New(rand.NewPCG(seed, 0xC4A5))} }

func (g *crashOps) batch() int { return g.rng.IntN(crashMaxBatch) + 1 }

func (g *crashOps) next() crashOp {
	r := g.rng
	// Half the writes land in a hot area so that rewrites of allocated
	// clusters are common; the rest spread out to keep allocating.
	var off int64
	if r.IntN(2) == 0 {
		off = r.Int64N(1 << 20)
	} else {
		off = r.Int64N(crashSize)
	}
	length := min(r.Int64N(3*crashCluster)+1, crashSize-off)
	switch r.IntN(16) {
	case 0:
		return crashOp{discard: true, off: off, length: length}
	case 1:
		return crashOp{discard: true, zero: true, off: off, length: length}
	}
	return crashOp{off: off, length: length, data: randomBytes(r, int(length))}
}

// TestCrashChild is the child side; it does nothing unless re-executed by
// TestCrash.
func TestCrashChild(t *testing.T) {
	spec := os.Getenv(crashChildEnv)
	if spec == "" {
		return
	}
	path, seedStr, _ := strings.Cut(spec, ",")
	seed, _ := strconv.ParseUint(seedStr, 10, 64)
	acks := os.NewFile(3, "acks")
	img, err := Open(path, OpenOptions{Direct: seed%2 == 0})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(3)
	}
	g := newCrashOps(seed)
	done := 0
	for done < 100000 {
		for range g.batch() {
			op := g.next()
			switch {
			case op.zero:
				err = img.WriteZeroes(op.off, op.length, true)
			case op.discard:
				err = img.Discard(op.off, op.length)
			default:
				_, err = img.WriteAt(op.data, op.off)
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "child op:", err)
				os.Exit(3)
			}
			done++
		}
		if err := img.Flush(); err != nil {
			fmt.Fprintln(os.Stderr, "child flush:", err)
			os.Exit(3)
		}
		fmt.Fprintf(acks, "%d\n", done)
	}
	os.Exit(4) // the parent should have killed us long ago
}

func TestCrash(t *testing.T) {
	iterations := 200
	if testing.Short() {
		iterations = 50
	}
	p := filepath.Join(t.TempDir(), "crash.hdd")
	img, err := Create(p, CreateOptions{Size: crashSize, ClusterSize: crashCluster})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	model := make([]byte, crashSize) // durable content so far
	rng := rand.New(rand.NewPCG(42, 42))
	start := time.Now()
	var totalAcks, totalOps int
	for it := range iterations {
		seed := rng.Uint64()
		killAfter := rng.IntN(6) + 1
		acked := runCrashChild(t, p, seed, killAfter)
		totalAcks += killAfter

		rep, err := Repair(p)
		if err != nil {
			t.Fatalf("iteration %d: repair: %v\n%s", it, err, rep)
		}
		if rep, err := Check(p); err != nil || len(rep.Problems) != 0 {
			t.Fatalf("iteration %d: not clean after repair: %v\n%s", it, err, rep)
		}
		if it%25 == 0 || it == iterations-1 {
			qemuCheck(t, p)
		}

		// Replay: operations up to the last acknowledgement are durable;
		// the ones after it (at most two batches can have run) may or
		// may not have reached the disk, byte by byte.
		g := newCrashOps(seed)
		var pending []crashOp
		n := 0
		for n < acked {
			for range g.batch() {
				op := g.next()
				if n < acked {
					apply(model, op)
				} else {
					pending = append(pending, op)
				}
				n++
			}
		}
		for range 2 {
			for range g.batch() {
				pending = append(pending, g.next())
			}
		}
		totalOps += acked
		img := mustOpen(t, p, OpenOptions{ReadOnly: true})
		got := readAll(t, img)
		img.Close()
		verifyCrashImage(t, it, got, model, pending)
		copy(model, got)
	}
	t.Logf("%d kills after %d acknowledgements, %d flushed operations verified, in %v",
		iterations, totalAcks, totalOps, time.Since(start).Round(time.Millisecond))
}

func apply(model []byte, op crashOp) {
	if op.discard {
		clear(model[op.off : op.off+op.length])
	} else {
		copy(model[op.off:], op.data)
	}
}

// runCrashChild starts the child on the image, reads acknowledgements
// until killAfter arrived, kills it with SIGKILL and returns the number of
// operations covered by the last acknowledgement it wrote.
func runCrashChild(t *testing.T, path string, seed uint64, killAfter int) int {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := testcmd.Child("TestCrashChild", fmt.Sprintf("%s=%s,%d", crashChildEnv, path, seed))
	cmd.ExtraFiles = []*os.File{w}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	sc := bufio.NewScanner(r)
	acked, seen := 0, 0
	for seen < killAfter && sc.Scan() {
		acked, _ = strconv.Atoi(sc.Text())
		seen++
	}
	cmd.Process.Signal(syscall.SIGKILL)
	err = cmd.Wait()
	if seen < killAfter {
		t.Fatalf("child ended after %d acknowledgements: %v\n%s", seen, err, stderr.String())
	}
	// Acknowledgements written before the kill are still in the pipe.
	for sc.Scan() {
		acked, _ = strconv.Atoi(sc.Text())
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child was not killed by SIGKILL: %v\n%s", cmd.ProcessState, stderr.String())
	}
	return acked
}

// verifyCrashImage checks that every byte of got is the durable model's
// byte, or a byte some pending operation may have written.
func verifyCrashImage(t *testing.T, it int, got, model []byte, pending []crashOp) {
	t.Helper()
	for c := 0; c < len(got); c += crashCluster {
		g, m := got[c:c+crashCluster], model[c:c+crashCluster]
		if bytes.Equal(g, m) {
			continue
		}
		for i := range g {
			if g[i] == m[i] {
				continue
			}
			off := int64(c + i)
			ok := false
			for _, op := range pending {
				if off < op.off || off >= op.off+op.length {
					continue
				}
				if op.discard && g[i] == 0 || !op.discard && op.data[off-op.off] == g[i] {
					ok = true
					break
				}
			}
			if !ok {
				t.Fatalf("iteration %d: byte %d is %#x, durable value %#x, and no pending operation wrote it",
					it, off, g[i], m[i])
			}
		}
	}
}
