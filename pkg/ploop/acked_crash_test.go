package ploop

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The acknowledged-write crash test: a child process (this test binary
// re-executed) runs ackedWriters writers on one image or stack, each on its
// own clusters, which all share the first BAT block, with a flusher and
// writer-side flushes in between. Every completed operation is reported to
// the parent over a pipe before the next one starts. The parent SIGKILLs
// the child at a random moment, repairs, and checks that every block holds
// the state of the last operation acknowledged for it, or of the one
// operation its writer may have had in flight: an acknowledged write is
// never lost, whether or not a flush followed it. The kill keeps the page
// cache, as the death of a serving process does.

const (
	ackedChildEnv = "PLOOP_ACKED_CRASH_CHILD"
	ackedWriters  = 8
	ackedSize     = 16 << 20
	ackedCluster  = 32 << 10
	ackedBlock    = 4096
	ackedBlocks   = ackedSize / ackedBlock
	ackedPerClust = ackedCluster / ackedBlock
)

// ackedOp is one operation of one writer: a block write or a discard of
// a whole cluster.
type ackedOp struct {
	discard bool
	block   int // the block written, or the cluster's first block
	version uint64
}

// ackedOps generates writer w's operations for a round; the parent
// regenerates them from the same seed. Writer w owns the clusters c with
// c % ackedWriters == w.
func ackedOps(seed uint64, round, w int) func() ackedOp {
	rng := rand.New(rand.NewPCG(seed, uint64(w)))
	n := uint64(0)
	clusters := ackedSize / ackedCluster / ackedWriters
	return func() ackedOp {
		n++
		c := rng.IntN(clusters)*ackedWriters + w
		if rng.IntN(24) == 0 {
			return ackedOp{discard: true, block: c * ackedPerClust}
		}
		// Versions are unique across rounds: content names its round.
		return ackedOp{block: c*ackedPerClust + rng.IntN(ackedPerClust), version: uint64(round)<<32 | n}
	}
}

func ackedContent(block int, version uint64) []byte {
	b := make([]byte, ackedBlock)
	if version == 0 {
		return b
	}
	for i := 0; i < ackedBlock; i += 16 {
		binary.LittleEndian.PutUint64(b[i:], uint64(block))
		binary.LittleEndian.PutUint64(b[i+8:], version)
	}
	return b
}

// ackedVersion decodes a block's content: 0 for zeros, -1 for anything
// that is not a whole write of this block.
func ackedVersion(block int, b []byte) int64 {
	v := binary.LittleEndian.Uint64(b[8:])
	if !bytes.Equal(b, ackedContent(block, v)) {
		return -1
	}
	return int64(v)
}

// ackedDisk is what the child writes: an Image or a Stack.
type ackedDisk interface {
	WriteAt(p []byte, off int64) (int, error)
	Discard(off, length int64) error
	Flush() error
}

// TestAckedCrashChild is the child side; it does nothing unless
// re-executed by TestAckedWritesSurviveKill.
func TestAckedCrashChild(t *testing.T) {
	spec := os.Getenv(ackedChildEnv)
	if spec == "" {
		return
	}
	parts := strings.Split(spec, ",")
	path := parts[0]
	seed, _ := strconv.ParseUint(parts[1], 10, 64)
	round, _ := strconv.Atoi(parts[2])
	acks := bufio.NewWriter(os.NewFile(3, "acks"))
	var d ackedDisk
	var err error
	if IsStackDir(path) {
		d, err = OpenStack(path, StackOptions{Direct: seed%2 == 0})
	} else {
		d, err = Open(path, OpenOptions{Direct: seed%2 == 0})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(3)
	}
	var ackMu sync.Mutex
	ack := func(line string) {
		ackMu.Lock()
		defer ackMu.Unlock()
		acks.WriteString(line)
		// Unbuffered towards the parent: what is acknowledged must be
		// in the pipe before the next operation starts.
		if err := acks.Flush(); err != nil {
			os.Exit(3)
		}
	}
	die := func(what string, err error) {
		fmt.Fprintln(os.Stderr, "child", what+":", err)
		os.Exit(3)
	}
	go func() {
		for {
			if err := d.Flush(); err != nil {
				die("flush", err)
			}
			time.Sleep(time.Duration(seed%5) * time.Millisecond)
		}
	}()
	for w := range ackedWriters {
		go func() {
			next := ackedOps(seed, round, w)
			for n := 1; ; n++ {
				op := next()
				var err error
				if op.discard {
					err = d.Discard(int64(op.block)*ackedBlock, ackedCluster)
				} else {
					_, err = d.WriteAt(ackedContent(op.block, op.version), int64(op.block)*ackedBlock)
				}
				if err != nil {
					die("op", err)
				}
				if n%7 == 0 {
					if err := d.Flush(); err != nil {
						die("flush", err)
					}
				}
				ack(fmt.Sprintf("%d %d\n", w, n))
			}
		}()
	}
	select {}
}

func TestAckedWritesSurviveKill(t *testing.T) {
	kills := 300
	if testing.Short() {
		kills = 40
	}
	for _, stack := range []bool{false, true} {
		name := "Image"
		if stack {
			name = "StackCopyUp"
		}
		t.Run(name, func(t *testing.T) { testAckedCrash(t, stack, kills) })
	}
}

func testAckedCrash(t *testing.T, stack bool, kills int) {
	dir := t.TempDir()
	path := filepath.Join(dir, "acked.hds")
	// model[b] is the version block b holds (0: zeros).
	model := make([]uint64, ackedBlocks)
	if stack {
		path = filepath.Join(dir, "stack")
		if err := InitStack(path, InitOptions{Size: ackedSize, ClusterSize: ackedCluster}); err != nil {
			t.Fatal(err)
		}
	} else {
		img, err := Create(path, CreateOptions{Size: ackedSize, ClusterSize: ackedCluster})
		if err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// A stack starts with data in every block of its base and takes a
	// snapshot every few rounds, so that writes keep copying clusters up.
	snapshot := func(round int) {
		s, err := OpenStack(path, StackOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if round == 0 {
			for b := range model {
				model[b] = uint64(1)<<63 | uint64(b)
				if _, err := s.WriteAt(ackedContent(b, model[b]), int64(b)*ackedBlock); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := Snapshot(path); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(uint64(kills), 0xACED))
	start := time.Now()
	var acked, maybe int
	for round := range kills {
		if stack && round%(kills/8+1) == 0 {
			snapshot(round)
		}
		seed := rng.Uint64()
		done := runAckedChild(t, path, seed, round, 1+rng.IntN(400))
		if stack {
			if _, err := RepairStack(path); err != nil {
				t.Fatalf("round %d: repair: %v", round, err)
			}
		} else {
			if rep, err := Repair(path); err != nil {
				t.Fatalf("round %d: repair: %v\n%s", round, err, rep)
			}
			if rep, err := Check(path); err != nil || len(rep.Problems) != 0 {
				t.Fatalf("round %d: not clean after repair: %v\n%s", round, err, rep)
			}
		}
		// want: the state after every acknowledged operation; alt: the
		// state the one operation each writer may have had in flight
		// would give its blocks.
		want := append([]uint64(nil), model...)
		alt := map[int]uint64{}
		for w := range ackedWriters {
			next := ackedOps(seed, round, w)
			for range done[w] {
				applyAcked(want, next(), nil)
				acked++
			}
			applyAcked(nil, next(), alt)
		}
		got := readAckedDisk(t, path, stack)
		for b := range ackedBlocks {
			v := ackedVersion(b, got[b*ackedBlock:(b+1)*ackedBlock])
			if v == int64(want[b]) {
				continue
			}
			if a, ok := alt[b]; ok && v == int64(a) {
				maybe++
				continue
			}
			t.Fatalf("round %d (seed %d): block %d holds version %#x, the last acknowledged operation left %#x (in flight: %v)",
				round, seed, b, v, want[b], alt[b])
		}
		for b := range model {
			model[b] = uint64(ackedVersion(b, got[b*ackedBlock:(b+1)*ackedBlock]))
		}
		if round%50 == 0 || round == kills-1 {
			if stack {
				qemuCheckTop(t, path)
			} else {
				qemuCheck(t, path)
			}
		}
	}
	t.Logf("%d kills, %d acknowledged operations verified, %d in-flight ones found applied, in %v",
		kills, acked, maybe, time.Since(start).Round(time.Millisecond))
}

// applyAcked applies op to the model in want, or records in alt what it
// would leave in each block it touches.
func applyAcked(want []uint64, op ackedOp, alt map[int]uint64) {
	n := 1
	if op.discard {
		n = ackedPerClust
	}
	for b := op.block; b < op.block+n; b++ {
		if alt != nil {
			alt[b] = op.version
		} else {
			want[b] = op.version
		}
	}
}

func readAckedDisk(t *testing.T, path string, stack bool) []byte {
	t.Helper()
	if stack {
		return readStack(t, path, "")
	}
	img := mustOpen(t, path, OpenOptions{ReadOnly: true})
	defer img.Close()
	return readAll(t, img)
}

// runAckedChild runs the child until killAfter acknowledgements arrived,
// kills it, and returns how many operations each writer acknowledged.
func runAckedChild(t *testing.T, path string, seed uint64, round, killAfter int) [ackedWriters]int {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := testcmd.Child("TestAckedCrashChild", fmt.Sprintf("%s=%s,%d,%d", ackedChildEnv, path, seed, round))
	cmd.ExtraFiles = []*os.File{w}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	var done [ackedWriters]int
	sc := bufio.NewScanner(r)
	record := func() {
		var wr, n int
		if _, err := fmt.Sscanf(sc.Text(), "%d %d", &wr, &n); err != nil || wr < 0 || wr >= ackedWriters {
			t.Fatalf("bad acknowledgement %q", sc.Text())
		}
		done[wr] = n
	}
	seen := 0
	for seen < killAfter && sc.Scan() {
		record()
		seen++
	}
	cmd.Process.Signal(syscall.SIGKILL)
	err = cmd.Wait()
	if seen < killAfter {
		t.Fatalf("child ended after %d acknowledgements: %v\n%s", seen, err, stderr.String())
	}
	// Acknowledgements written before the kill are still in the pipe.
	for sc.Scan() {
		record()
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child was not killed by SIGKILL: %v\n%s", cmd.ProcessState, stderr.String())
	}
	return done
}
