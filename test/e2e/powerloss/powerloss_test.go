// Package powerloss proves in the test VM that a power loss loses only
// writes that were never flushed, for ploop images and stacks served by
// our NBD server, and that online stack operations leave every object in
// its state before or after the operation.
//
// A power loss cannot be simulated by killing a process: the page cache
// survives, so the order in which data reaches the disk (and fsync's role
// in it) would never show. Instead, the ploop files live on ext4 on the
// kernel's dm-log-writes target, which logs every write to the disk in the
// order it became durable (package logwrites). The log is then replayed
// onto a copy of the initial file system to many points (every mark, and
// evenly spread points between them); each point is what the disk could
// hold after a power loss at that moment. At each point the host file
// system must pass e2fsck and mount, ploop's Repair must leave images that
// ploop's Check and `qemu-img check` find clean, and every block must hold
// what the writes and flushes before the point allow (model_test.go).
//
// The client is the kernel nbd driver attached to our server in this
// process: it is the production path (the CSI node plugin attaches the
// kernel device), fsync of the device sends exactly one NBD flush whose
// completion the test observes, and several goroutines can keep writes in
// flight with O_DIRECT while the test knows precisely which completed
// before each flush was issued.
package powerloss

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/test/e2e/logwrites"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
	"golang.org/x/sys/unix"
)

func TestPowerLoss(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Timeout: 35 * time.Minute}, []vmtest.Case{
		{Name: "LogFormat", Run: testLogFormat},
		{Name: "Image", Run: testImage},
		{Name: "Stack", Run: testStack},
	})
}

// TestPowerLossUblk replays power losses of an image served through ublk
// (the driver's second attach path), on the 6.12 kernel: the ublk server
// must pass flushes and FUA writes on as the NBD server does. The stack
// scenario grows its device online, which ublk cannot on 6.12.
func TestPowerLossUblk(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Kernel: vmtest.Kernel612, Timeout: 35 * time.Minute}, []vmtest.Case{
		{Name: "Image", Run: func(t *testing.T) {
			t.Setenv(transportEnv, "ublk")
			testImage(t)
		}},
	})
}

// scale is how much each scenario does: flushes between two stack
// operations (or in all, for the image) and replay points between marks.
type scale struct {
	flushes, gap int64
	between      int
}

func sizes() scale {
	if testing.Short() {
		return scale{flushes: 6, gap: 1, between: 30}
	}
	return scale{flushes: 16, gap: 2, between: 100}
}

// seed makes the writers' choices; PLOOP_CSI_POWERLOSS_SEED varies them
// (the interleaving varies from run to run anyway).
func seed(t *testing.T) uint64 {
	s := uint64(1)
	if v := os.Getenv("PLOOP_CSI_POWERLOSS_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("PLOOP_CSI_POWERLOSS_SEED=%q: %v", v, err)
		}
		s = n
	}
	t.Logf("workload seed %d (PLOOP_CSI_POWERLOSS_SEED)", s)
	return s
}

// testLogFormat proves the log reader against the kernel's own log: what
// is logged when (writes at the flush that covers them, FUA writes at
// once, marks in between) and that a replay yields the device's contents.
func testLogFormat(t *testing.T) {
	dir := t.TempDir()
	dataFile, logFile := filepath.Join(dir, "data.img"), filepath.Join(dir, "log.img")
	const devSize = 4 << 20
	for _, f := range []struct {
		path string
		size int64
	}{{dataFile, devSize}, {logFile, 64 << 20}} {
		if err := os.WriteFile(f.path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(f.path, f.size); err != nil {
			t.Fatal(err)
		}
	}
	data, err := attachLoop(dataFile)
	if err != nil {
		t.Fatal(err)
	}
	defer data.release()
	lgDev, err := attachLoop(logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer lgDev.release()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const name = "powerloss-format"
	if _, err := run(ctx, "dmsetup", "create", name, "--noudevsync", "--table",
		fmt.Sprintf("0 %d log-writes %s %s", devSize/512, data.path, lgDev.path)); err != nil {
		t.Fatal(err)
	}
	removed := false
	defer func() {
		if !removed {
			run(ctx, "dmsetup", "remove", "--noudevsync", name)
		}
	}()
	devPath, err := dmDevice(name)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := os.OpenFile(devPath, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	fua, err := os.OpenFile(devPath, os.O_RDWR|unix.O_DIRECT|unix.O_DSYNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fua.Close()
	buf := alignedBuffer(8192)
	defer unix.Munmap(buf)
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	write := func(f *os.File, off int64, n int, tag uint64) {
		t.Helper()
		for k := 0; k < n; k += blockSize {
			fillBlock(buf[k:], (off+int64(k))/blockSize, tag)
		}
		_, err := f.WriteAt(buf[:n], off)
		must(fmt.Sprintf("write %d bytes at %d", n, off), err)
	}
	const offA, offB, offC, offD = 64 << 10, 0, 128 << 10, 256 << 10
	write(dev, offA, 8192, 1)
	must("fsync", dev.Sync())
	must("mark m1", logwrites.Mark(name, "m1"))
	write(dev, offC, 4096, 3)
	must("discard", blkDiscard(dev, offC, 4096))
	must("fsync", dev.Sync())
	write(fua, offB, 4096, 2)
	must("mark m2", logwrites.Mark(name, "m2"))
	write(dev, offD, 4096, 4) // never flushed
	must("mark m3", logwrites.Mark(name, "m3"))
	dev.Close()
	fua.Close()
	_, err = run(ctx, "dmsetup", "remove", "--noudevsync", name)
	must("dmsetup remove", err)
	removed = true

	lf, err := os.Open(logFile)
	must("open log", err)
	defer lf.Close()
	lg, err := logwrites.Parse(lf, 64<<20)
	must("parse log", err)
	for i, e := range lg.Entries {
		t.Logf("entry %d: %v", i, e)
	}
	if lg.SectorSize != 512 {
		t.Errorf("log sector size %d, want the loop device's 512", lg.SectorSize)
	}
	idx := map[string]int{}
	for _, m := range []string{"m1", "m2", "m3", "dm-log-writes-end"} {
		i, err := lg.Mark(m)
		must("find mark", err)
		idx[m] = i
	}
	find := func(off int64, flags logwrites.Flags) int {
		for i, e := range lg.Entries {
			if e.Offset(lg.SectorSize) == off && e.Flags&flags == flags && e.Sectors > 0 {
				return i
			}
		}
		t.Fatalf("no entry with flags %v at byte %d", flags, off)
		return -1
	}
	a, b, c, d := find(offA, 0), find(offB, logwrites.FlagFUA), find(offC, 0), find(offD, 0)
	disc := find(offC, logwrites.FlagDiscard)
	flush := -1
	for i := a; i < idx["m1"]; i++ {
		if lg.Entries[i].Flags&logwrites.FlagFlush != 0 {
			flush = i
		}
	}
	switch {
	case !(a < flush && flush < idx["m1"]):
		t.Errorf("write A (entry %d) and the flush after it (entry %d) must precede mark m1 (entry %d)", a, flush, idx["m1"])
	case !(idx["m1"] < c && c < disc && disc < b && b < idx["m2"]):
		t.Errorf("want m1 (%d) < write C (%d) < its discard (%d) < FUA write B (%d) < m2 (%d)", idx["m1"], c, disc, b, idx["m2"])
	case !(idx["m3"] < d && d < idx["dm-log-writes-end"]):
		t.Errorf("the unflushed write D (entry %d) must be logged by the destructor, after m3 (%d) and before the end mark (%d)", d, idx["m3"], idx["dm-log-writes-end"])
	}

	replay := filepath.Join(dir, "replay.img")
	must("create replay", os.WriteFile(replay, nil, 0o600))
	must("size replay", os.Truncate(replay, devSize))
	rf, err := os.OpenFile(replay, os.O_RDWR, 0)
	must("open replay", err)
	defer rf.Close()
	rp := lg.NewReplayer(rf, devSize)
	expect := func(at string, want map[int64]uint64) {
		t.Helper()
		p := make([]byte, blockSize)
		for blk := int64(0); blk < devSize/blockSize; blk++ {
			_, err := rf.ReadAt(p, blk*blockSize)
			must("read replay", err)
			got := decodeBlock(p, blk)
			tag, ok := want[blk*blockSize]
			switch {
			case !ok && !got.zero:
				t.Errorf("at %s: block %d holds %v, want zeros", at, blk, got)
			case ok && got.tag != tag:
				t.Errorf("at %s: block %d holds %v, want write #%d", at, blk, got, tag)
			}
		}
	}
	must("replay to m1", rp.ReplayTo(idx["m1"]+1))
	expect("m1", map[int64]uint64{offA: 1, offA + 4096: 1})
	must("replay to m2", rp.ReplayTo(idx["m2"]+1))
	expect("m2", map[int64]uint64{offA: 1, offA + 4096: 1, offB: 2})
	must("replay all", rp.ReplayTo(len(lg.Entries)))
	expect("the end", map[int64]uint64{offA: 1, offA + 4096: 1, offB: 2, offD: 4})
	if err := sameContents(replay, dataFile); err != nil {
		t.Errorf("the full replay differs from the device: %v", err)
	}
}

// testImage runs concurrent writes, discards and flushes against a single
// ploop image on the logged ext4 and checks every replay point.
func testImage(t *testing.T) {
	const size, cs = 4 << 20, 64 << 10
	sc := sizes()
	r := newRig(t, "image", 64, 1024)
	path := filepath.Join(r.mnt, "disk.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: size, ClusterSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	// After a failure: let go of the mount (a second Close is harmless).
	t.Cleanup(func() { img.Close() })
	blocks := make([]int64, size/blockSize)
	for i := range blocks {
		blocks[i] = int64(i)
	}
	m := newModel(blocks)
	if err := m.mark(r.mark, "ready", nil); err != nil {
		t.Fatal(err)
	}
	s := serve(t, img, "powerloss-image")
	wl := newWorkload(m, r, s.dev, cs)
	wl.discard = true
	wl.clusters = func(w int) []int64 {
		var cl []int64
		for c := int64(w); c < size/cs; c += int64(wl.writers) {
			cl = append(cl, c)
		}
		return cl
	}
	t0 := time.Now()
	rn := wl.start(seed(t))
	ctx, cancel := rn.ctx(10 * time.Minute)
	err = wl.waitFlushes(ctx, sc.flushes)
	cancel()
	if serr := rn.stop(); serr != nil {
		t.Fatal(serr)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := wl.flush(); err != nil {
		t.Fatal(err)
	}
	s.disconnect(t)
	if got := s.disk.flushes.Load(); got < wl.flushes.Load() {
		t.Fatalf("the server saw %d flushes, the client sent %d", got, wl.flushes.Load())
	}
	if err := img.Close(); err != nil {
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
	replayAndCheck(t, r, lg, choosePoints(lg, m, from, sc.between), func(ctx context.Context, p *point, mnt string) ([]string, []string) {
		return checkImage(ctx, m, q, p, filepath.Join(mnt, "disk.hds"), size, &r.timing)
	})
	t.Logf("qemu-img check ran %d times", q.runs)
}

// checkImage checks the image at path at point p: Check, Repair, Check
// again (clean), the data, and qemu-img check.
func checkImage(ctx context.Context, m *model, q *qemuImgChecker, p *point, path string, size int64, tm *phaseTimes) (probs, notes []string) {
	before, err := ploop.Check(path)
	if err != nil {
		return []string{fmt.Sprintf("ploop.Check: %v", err)}, nil
	}
	notes = problemNotes("before repair", before)
	if p.ps.applied["closed"] && len(before.Problems) != 0 {
		probs = append(probs, fmt.Sprintf("the image was closed before this point, yet Check reports: %s", strings.TrimSpace(before.String())))
	}
	if _, err := ploop.Repair(path); err != nil {
		return append(probs, fmt.Sprintf("ploop.Repair: %v (before repair: %s)", err, strings.TrimSpace(before.String()))), notes
	}
	after, err := ploop.Check(path)
	if err != nil {
		return append(probs, fmt.Sprintf("ploop.Check after Repair: %v", err)), notes
	}
	if len(after.Problems) != 0 {
		probs = append(probs, fmt.Sprintf("ploop.Check after Repair: %s", strings.TrimSpace(after.String())))
	}
	img, err := ploop.Open(path, ploop.OpenOptions{ReadOnly: true})
	if err != nil {
		return append(probs, fmt.Sprintf("open the repaired image: %v", err)), notes
	}
	defer img.Close()
	if img.Size() != size {
		probs = append(probs, fmt.Sprintf("image size %d, want %d", img.Size(), size))
	}
	maps := img.Map()
	where := func(block int64) string {
		c := block * blockSize / img.ClusterSize()
		loc := "unallocated"
		for _, mp := range maps {
			if off := c * img.ClusterSize(); off >= mp.Offset && off < mp.Offset+mp.Length {
				loc = fmt.Sprintf("at file offset %d", mp.Host+off-mp.Offset)
			}
		}
		return fmt.Sprintf(" [cluster %d %s after repair%s]", c, loc, entryProblems(before, c))
	}
	t0 := time.Now()
	dp, _ := m.verify(img.ReadAt, img.Size(), p.ps, 8, where)
	tm.add("verify data", t0)
	probs = append(probs, dp...)
	if err := q.check(ctx, path); err != nil {
		probs = append(probs, err.Error())
	}
	return probs, notes
}

// problemNotes names the kinds of problems a report holds, for counting.
func problemNotes(prefix string, r *ploop.Report) []string {
	seen := map[ploop.ProblemKind]bool{}
	var notes []string
	for _, p := range r.Problems {
		if !seen[p.Kind] {
			seen[p.Kind] = true
			notes = append(notes, fmt.Sprintf("%s: %s", prefix, p.Kind))
		}
	}
	return notes
}

// entryProblems lists what r said about BAT entry c.
func entryProblems(r *ploop.Report, c int64) string {
	var parts []string
	for _, p := range r.Problems {
		if p.Entry == c {
			parts = append(parts, fmt.Sprintf("%s: %s", p.Kind, p.Detail))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return "; before repair " + strings.Join(parts, "; ")
}
