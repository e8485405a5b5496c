package drivere2e

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// testKillUnderWriter: a writer appends fsynced records to a file on a
// staged and published ext4 volume while the driver is SIGKILLed 10 times,
// each time restarted on the same socket, root and node id. Each successor
// takes the volume's nbd device over before it answers Probe; the writer
// sees no error and keeps going after every kill. After unpublish and
// unstage the stack is clean, e2fsck -fn finds the filesystem clean
// (staged as Block: no fsck or mount of the driver's own runs first), and
// the file holds every acknowledged record.
func testKillUnderWriter(t *testing.T) {
	kills := 10
	if os.Getenv(attachEnv) == "ublk" {
		// On 6.12 a killed ublk server takes 5-20 s to die (the
		// kernel's monitor of dead servers runs every 5 s): fewer
		// kills keep the case within CI's budget.
		kills = 5
	}
	const recSize = 32 << 10
	step := int64(16) // records acknowledged between kills
	if testing.Short() {
		step = 8
	}
	e := newEnv(t, 1024)
	v := e.create("killed", 512*mib, mountCap("ext4"), nil)
	e.up(v)
	w := startWriter(t, filepath.Join(v.target, "log"), recSize)

	var takeover, recovery, stall []time.Duration
	for i := range kills {
		w.waitAcked(t, e.ctx, w.acked.Load()+step)
		at := w.acked.Load()
		old := e.d.Pid()
		start := time.Now()
		e.restart(true)
		took := time.Since(start)
		// The first record acknowledged after the kill: the device's I/O
		// flows again.
		w.waitAcked(t, e.ctx, at+1)
		stalled := time.Duration(w.lastAck.Load() - start.UnixNano())
		rec := recoveryTook(t, e.d.Log())
		takeover, recovery, stall = append(takeover, took), append(recovery, rec), append(stall, stalled)
		t.Logf("kill %d: pid %d SIGKILLed with the writer at %d records; pid %d recovered the volume in %v and answered Probe %v after the kill; the writer's next record was acknowledged %v after the kill",
			i+1, old, at, e.d.Pid(), rec.Round(time.Millisecond), took.Round(time.Millisecond), stalled.Round(time.Millisecond))
	}
	w.waitAcked(t, e.ctx, w.acked.Load()+step)
	acked := w.finish()
	started := w.started.Load() // final: the writer has stopped
	if errs := w.errors(); len(errs) > 0 {
		t.Fatalf("the writer saw %d errors across %d kills: %v", len(errs), kills, errs)
	}
	t.Logf("writer: %d records of %d KiB (%d MiB) appended and fsynced across %d SIGKILLs, no errors; slowest record %v",
		acked, recSize>>10, acked*recSize>>20, kills, time.Duration(w.slowest.Load()).Round(time.Millisecond))
	t.Logf("takeover (kill to Probe answered): min %v, max %v; recovery in the successor: min %v, max %v; writer stall (kill to next acknowledgement): min %v, max %v",
		slices.Min(takeover).Round(time.Millisecond), slices.Max(takeover).Round(time.Millisecond),
		slices.Min(recovery).Round(time.Millisecond), slices.Max(recovery).Round(time.Millisecond),
		slices.Min(stall).Round(time.Millisecond), slices.Max(stall).Round(time.Millisecond))

	if _, c := e.stats(v); c.Abnormal {
		t.Fatalf("after the kills the volume is abnormal: %s", c.Message)
	}
	if os.Getenv(attachEnv) == "ublk" && !strings.Contains(e.d.Log(), "reattached volume through ublk") {
		t.Fatalf("the driver was to attach through ublk, and its last successor did not take a ublk device over:\n%s", e.d.Log())
	}
	e.down(v)
	wantClean(t, e.stackDir(v))
	e.fsckBlock(v)
	e.up(v)
	dropCaches(t)
	k := verifyLog(t, filepath.Join(v.target, "log"), recSize, acked, started)
	t.Logf("after unstage, e2fsck -fn clean; the log holds %d records, all verified", k)
	e.down(v)
	e.deleteVolume(v)
	e.finish()
}

// recoveredLine is the driver's log line of its finished restart recovery.
var recoveredLine = regexp.MustCompile(`"recovered node state".* volumes=1 took="([^"]+)"`)

// recoveryTook is how long the restart recovery took, as the driver
// logged it.
func recoveryTook(t *testing.T, log string) time.Duration {
	t.Helper()
	m := recoveredLine.FindStringSubmatch(log)
	if m == nil {
		t.Fatalf("the driver did not log its recovery of the volume:\n%s", log)
	}
	d, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatalf("recovery time %q: %v", m[1], err)
	}
	return d
}
