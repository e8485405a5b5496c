package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
	"golang.org/x/sys/unix"
)

// onlineWrite is one 4 KiB write qemu-io makes through the served stack.
type onlineWrite struct {
	off int64
	pat byte
}

const onlineBlock = 4096

// qemuIOWhile streams writes to uri with one qemu-io process (which issues
// them one after another) and runs action once a third of them have been
// acknowledged, while the rest keep coming. It returns how many writes
// qemu-io had acknowledged when action started.
func qemuIOWhile(t *testing.T, uri string, writes []onlineWrite, action func()) int {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "raw", uri)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		w := bufio.NewWriter(stdin)
		for _, wr := range writes {
			fmt.Fprintf(w, "write -P 0x%x %d %d\n", wr.pat, wr.off, onlineBlock)
		}
		w.WriteString("flush\n")
		w.Flush()
		stdin.Close()
	}()
	done := make(chan struct{})
	started, acked := -1, 0
	var out bytes.Buffer
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		if strings.Contains(line, "wrote ") {
			acked++
		}
		if started < 0 && acked >= len(writes)/3 {
			started = acked
			go func() {
				defer close(done)
				action()
			}()
		}
	}
	io.Copy(io.Discard, stdout)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("qemu-io: %v\n%s\n%s", err, stderr.String(), out.String())
	}
	if started < 0 {
		t.Fatalf("qemu-io acknowledged %d of %d writes:\n%s\n%s", acked, len(writes), stderr.String(), out.String())
	}
	<-done
	if acked != len(writes) || strings.Contains(out.String(), "error") {
		t.Fatalf("qemu-io acknowledged %d of %d writes:\n%s", acked, len(writes), out.String())
	}
	return started
}

// prefixApplied checks that got equals model with some prefix of writes
// applied, at least the first min of them, and returns the prefix length.
func prefixApplied(t *testing.T, what string, got, model []byte, writes []onlineWrite, minDone int) int {
	t.Helper()
	j := 0
	for j < len(writes) && got[writes[j].off] == writes[j].pat {
		j++
	}
	want := applyWrites(model, writes[:j])
	if !bytes.Equal(got, want) {
		t.Fatalf("%s is not the disk after the first %d writes: %s", what, j, diffAt(got, want))
	}
	if j < minDone {
		t.Fatalf("%s has the first %d writes, but %d had been acknowledged before", what, j, minDone)
	}
	return j
}

func applyWrites(model []byte, writes []onlineWrite) []byte {
	m := append([]byte(nil), model...)
	for _, w := range writes {
		copy(m[w.off:w.off+onlineBlock], bytes.Repeat([]byte{w.pat}, onlineBlock))
	}
	return m
}

func diffAt(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("sizes %d and %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at %d: %#x, want %#x", i, a[i], b[i])
		}
	}
	return "equal"
}

// phaseWrites is n consecutive 4 KiB writes of pat from start: each phase
// writes its own region, so a merge must really move the clusters of the
// region a snapshot's delta holds (the copy-ups of later phases do not
// cover them).
func phaseWrites(pat byte, n int, start int64) []onlineWrite {
	ws := make([]onlineWrite, n)
	for i := range ws {
		ws[i] = onlineWrite{off: start + int64(i)*onlineBlock, pat: pat}
	}
	return ws
}

// TestOnlineStackVerbs serves a stack with `ploopctl serve` and, while
// qemu-io writes through it, runs `ploopctl snapshot`, `snapshot-delete`
// (into a lower delta and into the top), `grow` and `compact` on the
// directory: the verbs find the served stack's control socket. Each
// snapshot, exported
// with `convert -u`, holds exactly a prefix of the writes streaming during
// it (and at least those acknowledged before it started); the final disk
// holds them all; every delta passes qemu-img check.
func TestOnlineStackVerbs(t *testing.T) {
	serveNeed(t, "qemu-img", "qemu-io", "nbdinfo")
	const size = 16 << 20
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "vol")
	mustPloopctl(t, "init", "-s", "16M", "--cluster-size", "64K", dir)
	sock := filepath.Join(tmp, "nbd.sock")
	uri, stop := startServe(t, "--socket", sock, "--export", "vol", dir)
	if fi, err := os.Stat(serving.ControlPath(dir)); err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("control socket: %v %v", fi, err)
	}
	model := make([]byte, size)
	phase := func(pat byte, region int64, action func()) ([]byte, []onlineWrite, int) {
		ws := phaseWrites(pat, 600, region*3<<20)
		before := model
		started := qemuIOWhile(t, uri, ws, action)
		model = applyWrites(model, ws)
		return before, ws, started
	}

	// A snapshot while writes stream.
	var snap1 string
	before, ws, started := phase(0x11, 0, func() { snap1 = strings.TrimSpace(mustPloopctl(t, "snapshot", dir)) })
	j := prefixApplied(t, "snapshot 1", exportRaw(t, dir, snap1), before, ws, started)
	t.Logf("snapshot 1 froze %d of %d writes (%d acknowledged before it started)", j, len(ws), started)

	var snap2 string
	before, ws, started = phase(0x22, 1, func() { snap2 = strings.TrimSpace(mustPloopctl(t, "snapshot", dir)) })
	j = prefixApplied(t, "snapshot 2", exportRaw(t, dir, snap2), before, ws, started)
	s2 := applyWrites(before, ws[:j])
	t.Logf("snapshot 2 froze %d of %d writes (%d acknowledged before it started)", j, len(ws), started)

	// Merge snapshot 1 (the base) into snapshot 2's delta, then snapshot 2
	// into the top, while writes stream.
	phase(0x33, 2, func() { mustPloopctl(t, "snapshot-delete", "-u", snap1, dir) })
	if got := exportRaw(t, dir, snap2); !bytes.Equal(got, s2) {
		t.Fatalf("snapshot 2 after merging snapshot 1 into it: %s", diffAt(got, s2))
	}
	phase(0x44, 3, func() { mustPloopctl(t, "snapshot-delete", "-u", snap2, dir) })
	out := mustPloopctl(t, "snapshot-list", dir)
	if strings.Contains(out, snap1) || strings.Contains(out, snap2) {
		t.Fatalf("snapshot-list still shows a deleted snapshot:\n%s", out)
	}

	// Grow while writes stream; a new connection sees the new size and
	// can write past the old end.
	phase(0x55, 4, func() { mustPloopctl(t, "grow", "-s", "32M", dir) })
	info := serveRun(t, "nbdinfo", "--size", uri)
	if strings.TrimSpace(info) != "33554432" {
		t.Fatalf("nbdinfo --size after grow: %q", info)
	}
	serveRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x66 20M 1M", "-c", "flush", uri)
	model = append(model, make([]byte, size)...)
	copy(model[20<<20:21<<20], bytes.Repeat([]byte{0x66}, 1<<20))

	// Compact while writes stream: 1 MiB written and then zeroed (kept
	// allocated: write -z sends NO_HOLE) must be given back.
	serveRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 24M 1M", "-c", "flush", uri)
	serveRun(t, "qemu-io", "-f", "raw", "-c", "write -z 24M 1M", "-c", "flush", uri)
	var compacted ploop.CompactResult
	phase(0x88, 5, func() {
		out := mustPloopctl(t, "compact", "--json", dir)
		if err := json.Unmarshal([]byte(out), &compacted); err != nil {
			t.Errorf("compact --json: %v\n%s", err, out)
		}
	})
	if compacted.ZeroClusters < 16 || compacted.FileSizeAfter >= compacted.FileSizeBefore {
		t.Fatalf("online compact of a top with 16 zeroed clusters: %+v", compacted)
	}
	t.Logf("online compact: %+v", compacted)

	// The served disk, then the closed stack, equal the model.
	raw := filepath.Join(tmp, "live.raw")
	serveRun(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, raw)
	if got, err := os.ReadFile(raw); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("served disk: %v %s", err, diffAt(got, model))
	}
	if code := stop(); code != 0 {
		t.Fatalf("ploopctl serve exited %d", code)
	}
	if _, err := os.Stat(serving.ControlPath(dir)); !os.IsNotExist(err) {
		t.Fatalf("control socket left behind: %v", err)
	}
	if got := exportRaw(t, dir, ""); !bytes.Equal(got, model) {
		t.Fatalf("stack after serve: %s", diffAt(got, model))
	}
	mustPloopctl(t, "check", dir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "root.hds") {
			serveRun(t, "qemu-img", "check", "-f", "parallels", filepath.Join(dir, e.Name()))
		}
	}
	// Not served any more: the verbs work offline again.
	mustPloopctl(t, "snapshot", dir)
}

// testAttachStackOnline (in the VM) attaches a stack directory to the
// kernel with a mounted ext4, takes a snapshot of the frozen filesystem,
// grows the stack online (the device grows and resize2fs grows the mounted
// filesystem), merges the snapshot away, all through the served stack's
// control socket, and checks the data and every delta afterwards.
func testAttachStackOnline(t *testing.T) {
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "vol")
	guestMust(t, guestPloopctl(), "init", "-s", "64M", dir)
	dev, cmd, stderr := startAttach(t, dir)
	guestMust(t, "mkfs.ext4", "-q", dev)
	guestMust(t, guestPloopctl(), "detach", dev)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("attach exited with %v after detach; stderr: %s", err, stderr)
	}
	mnt := filepath.Join(tmp, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	dev, cmd, stderr = startAttach(t, "--mount", mnt, dir)
	before := bytes.Repeat([]byte("before snapshot "), 1<<16)
	if err := os.WriteFile(filepath.Join(mnt, "a"), before, 0o600); err != nil {
		t.Fatal(err)
	}
	guestMust(t, "fsfreeze", "-f", mnt)
	guid := strings.TrimSpace(guestMust(t, guestPloopctl(), "snapshot", dir))
	guestMust(t, "fsfreeze", "-u", mnt)
	after := bytes.Repeat([]byte("after snapshot "), 1<<16)
	if err := os.WriteFile(filepath.Join(mnt, "b"), after, 0o600); err != nil {
		t.Fatal(err)
	}

	// The snapshot is a clean filesystem with only file a.
	snapRaw := filepath.Join(tmp, "snap.raw")
	guestMust(t, guestPloopctl(), "convert", "-u", guid, dir, snapRaw)
	guestMust(t, "e2fsck", "-fn", snapRaw)
	out := guestMust(t, "debugfs", "-R", "ls -l /", snapRaw)
	if names := strings.Fields(out); !slices.Contains(names, "a") || slices.Contains(names, "b") {
		t.Fatalf("snapshot root directory:\n%s", out)
	}

	guestMust(t, guestPloopctl(), "grow", "-s", "128M", dir)
	sectors := strings.TrimSpace(guestMust(t, "cat", "/sys/block/"+filepath.Base(dev)+"/size"))
	if sectors != "262144" {
		t.Fatalf("%s has %s sectors after an online grow to 128M, want 262144", dev, sectors)
	}
	guestMust(t, "resize2fs", dev)
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if total := int64(st.Blocks) * st.Bsize; total < 100<<20 {
		t.Fatalf("filesystem is %d bytes after resize2fs, want about 128M", total)
	}
	// Fill part of the new space, merge the snapshot while writing.
	big := bytes.Repeat([]byte("grown "), 15<<20)
	errc := make(chan error, 1)
	go func() { errc <- os.WriteFile(filepath.Join(mnt, "c"), big, 0o600) }()
	guestMust(t, guestPloopctl(), "snapshot-delete", "-u", guid, dir)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	guestMust(t, guestPloopctl(), "detach", dev)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("attach exited with %v after detach; stderr: %s", err, stderr)
	}
	guestMust(t, guestPloopctl(), "check", dir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "root.hds") {
			guestMust(t, "qemu-img", "check", "-f", "parallels", filepath.Join(dir, e.Name()))
		}
	}
	dev, cmd, stderr = startAttach(t, "--read-only", "--mount", mnt, dir)
	for name, want := range map[string][]byte{"a": before, "b": after, "c": big} {
		if got, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("file %s after re-attach: %d bytes, %v", name, len(got), err)
		}
	}
	guestMust(t, guestPloopctl(), "detach", dev)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("read-only attach exited with %v; stderr: %s", err, stderr)
	}
	final := filepath.Join(tmp, "final.raw")
	guestMust(t, guestPloopctl(), "convert", dir, final)
	guestMust(t, "e2fsck", "-fn", final)
}

// TestControlSocketStale: a control socket left by a killed server (nobody
// listening) does not stop the verbs from working offline.
func TestControlSocketStale(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	mustPloopctl(t, "init", "-s", "1M", dir)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: serving.ControlPath(dir), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	guid := strings.TrimSpace(mustPloopctl(t, "snapshot", dir))
	mustPloopctl(t, "grow", "-s", "2M", dir)
	mustPloopctl(t, "snapshot-delete", "-u", guid, dir)
	mustPloopctl(t, "compact", dir)
	if out := mustPloopctl(t, "snapshot-list", dir); strings.Contains(out, guid) {
		t.Fatalf("snapshot-list after deleting %s:\n%s", guid, out)
	}
	if _, err := callServed(dir, serving.Request{Op: serving.OpSnapshot}); !errors.Is(err, serving.ErrNotServed) {
		t.Fatalf("control call to a stale socket: %v, want serving.ErrNotServed", err)
	}
}

// TestOnlineMergeKilled SIGKILLs `ploopctl serve` at growing points of an
// online merge (snapshot-delete of the base into the top): when the top
// delta has received 0/8 .. 7/8 of the clusters to copy, and once after
// the merge finished. After `check --repair` the stack must read exactly
// what was written (a merge never changes the contents) and every delta
// must pass qemu-img check.
func TestOnlineMergeKilled(t *testing.T) {
	serveNeed(t, "qemu-img", "qemu-io")
	const toCopy = 40 << 20 // the base's clusters the top lacks
	survived := 0
	for i := range 9 {
		t.Run(fmt.Sprint("at-eighth-", i), func(t *testing.T) {
			tmp := t.TempDir()
			dir := filepath.Join(tmp, "vol")
			mustPloopctl(t, "init", "-s", "64M", "--cluster-size", "64K", dir)
			cmd, _, uri := startServeCmd(t, nil, "--socket", filepath.Join(tmp, "nbd.sock"), dir)
			defer cmd.Process.Kill()
			serveRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 48M", "-c", "flush", uri)
			guid := strings.TrimSpace(mustPloopctl(t, "snapshot", dir))
			serveRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 40M 16M", "-c", "flush", uri)
			model := make([]byte, 64<<20)
			copy(model[:48<<20], bytes.Repeat([]byte{0x11}, 48<<20))
			copy(model[40<<20:56<<20], bytes.Repeat([]byte{0x22}, 16<<20))
			top := topDeltaPath(t, dir)
			st0, err := os.Stat(top)
			if err != nil {
				t.Fatal(err)
			}
			merged := make(chan error, 1)
			go func() {
				_, err := callServed(dir, serving.Request{Op: serving.OpSnapshotDelete, GUID: guid})
				merged <- err
			}()
			if i == 8 {
				if err := <-merged; err != nil {
					t.Fatal(err)
				}
			} else {
				// Wait, without sleeping, until the copy reached i/8.
				target := st0.Size() + int64(i)*toCopy/8
				deadline := time.Now().Add(time.Minute)
				for {
					st, err := os.Stat(top)
					if err != nil || st.Size() >= target {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("the merge did not reach %d bytes in a minute", target)
					}
					runtime.Gosched()
				}
			}
			cmd.Process.Signal(syscall.SIGKILL)
			cmd.Wait()
			if _, _, code := ploopctl(t, "check", "--repair", dir); code != exitOK {
				t.Fatalf("check --repair after the kill: exit %d", code)
			}
			if got := exportRaw(t, dir, ""); !bytes.Equal(got, model) {
				t.Fatalf("stack after kill and repair: %s", diffAt(got, model))
			}
			if strings.Contains(mustPloopctl(t, "snapshot-list", dir), guid) {
				survived++
			}
			ents, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), "root.hds") {
					serveRun(t, "qemu-img", "check", "-f", "parallels", filepath.Join(dir, e.Name()))
				}
			}
		})
	}
	t.Logf("the kill came before the merge's switch in %d of 9 runs", survived)
	if survived == 9 {
		t.Fatal("the merge never finished")
	}
}

// topDeltaPath is the file of the stack's top delta.
func topDeltaPath(t *testing.T, dir string) string {
	t.Helper()
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	chain := d.Chain()
	return filepath.Join(dir, chain[len(chain)-1].File)
}

// TestOnlineOpsKilled SIGKILLs `ploopctl serve` at random moments of an
// online snapshot, relocating grow and compaction requested over the
// control socket. None of them changes what the volume reads, so after
// `check --repair` the stack must read exactly as before (grow: at the old
// or the new size, zeros past the old), a snapshot that survived must read
// the same too, and every delta must pass qemu-img check. The first run of
// each operation is not killed; it measures how long the operation takes,
// and the later runs kill at a random point of that time.
func TestOnlineOpsKilled(t *testing.T) {
	serveNeed(t, "qemu-img", "qemu-io")
	seed := uint64(time.Now().UnixNano())
	t.Logf("kill times from seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 5))
	const size, grown = 64 << 20, 260 << 20 // past one 32 KiB BAT cluster: relocation
	model := make([]byte, size)
	copy(model, bytes.Repeat([]byte{0x5a}, 32<<20))
	clear(model[4<<20 : 12<<20])
	for _, op := range []string{"snapshot", "grow", "compact"} {
		t.Run(op, func(t *testing.T) {
			var took time.Duration
			outcomes := map[string]int{}
			for i := range 8 {
				tmp := t.TempDir()
				dir := filepath.Join(tmp, "vol")
				mustPloopctl(t, "init", "-s", "64M", "--cluster-size", "32K", dir)
				cmd, _, uri := startServeCmd(t, nil, "--socket", filepath.Join(tmp, "nbd.sock"), dir)
				// Data with a discarded hole in the middle, so that
				// compaction has clusters to move down.
				serveRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 32M", "-c", "discard 4M 8M", "-c", "flush", uri)
				req := serving.Request{Op: serving.Op(op)}
				if op == "grow" {
					req.Size = grown
				}
				done := make(chan error, 1)
				start := time.Now()
				go func() {
					_, err := callServed(dir, req)
					done <- err
				}()
				var timer *time.Timer
				if i > 0 {
					timer = time.AfterFunc(time.Duration(rng.Int64N(int64(took)+1)), func() {
						cmd.Process.Signal(syscall.SIGKILL)
					})
				}
				err := <-done
				if i == 0 {
					if err != nil {
						t.Fatalf("%s: %v", op, err)
					}
					took = time.Since(start)
				} else if timer.Stop() {
					outcomes["finished before the kill"]++
				} else {
					outcomes["killed"]++
				}
				cmd.Process.Signal(syscall.SIGKILL)
				cmd.Wait()
				if _, _, code := ploopctl(t, "check", "--repair", dir); code != exitOK {
					t.Fatalf("run %d: check --repair after the kill: exit %d", i, code)
				}
				raw := filepath.Join(tmp, "out.raw")
				mustPloopctl(t, "convert", dir, raw)
				got, err := os.ReadFile(raw)
				if err != nil {
					t.Fatal(err)
				}
				switch {
				case len(got) == grown && op == "grow":
					outcomes["grown"]++
					if !bytes.Equal(got[size:], make([]byte, grown-size)) {
						t.Fatalf("run %d: the grown part is not zeros", i)
					}
					got = got[:size]
				case len(got) != size:
					t.Fatalf("run %d: the volume has %d bytes", i, len(got))
				}
				if !bytes.Equal(got, model) {
					t.Fatalf("run %d: volume after kill and repair: %s", i, diffAt(got, model))
				}
				d, err := ploop.ReadDescriptor(dir)
				if err != nil {
					t.Fatal(err)
				}
				chain := d.Chain()
				if op == "snapshot" && len(chain) > 1 {
					outcomes["snapshot kept"]++
					mustPloopctl(t, "convert", "-u", chain[0].GUID, dir, raw+".snap")
					if snap, err := os.ReadFile(raw + ".snap"); err != nil || !bytes.Equal(snap, model) {
						t.Fatalf("run %d: the new snapshot does not read as the volume did: %v", i, err)
					}
				}
				for _, im := range chain {
					serveRun(t, "qemu-img", "check", "-f", "parallels", filepath.Join(dir, im.File))
				}
			}
			t.Logf("%s took %v uninterrupted; %v", op, took, outcomes)
		})
	}
}
