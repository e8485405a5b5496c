package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"golang.org/x/sys/unix"
)

// filePattern is the deterministic content of test file i.
func filePattern(i, size int) []byte {
	r := rand.New(rand.NewPCG(uint64(i), 7))
	b := make([]byte, size)
	for j := range b {
		b[j] = byte(r.Uint32())
	}
	return b
}

// writeSynced writes a file and fsyncs it: when it returns nil, the
// kernel has been told the data is on the device.
func writeSynced(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// syncedWriter writes fsync'ed files into a directory until stopped; any
// error is a failure of whatever the test does underneath it.
type syncedWriter struct {
	dir      string
	size     int
	written  atomic.Int64
	progress chan struct{} // closed when the writer fails
	stop     chan struct{}
	wg       sync.WaitGroup
	err      error
}

func startWriter(dir string, size int) *syncedWriter {
	w := &syncedWriter{dir: dir, size: size, progress: make(chan struct{}, 1), stop: make(chan struct{})}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			if err := writeSynced(filepath.Join(dir, fmt.Sprintf("f%05d", i)), filePattern(i, size)); err != nil {
				w.err = fmt.Errorf("file %d: %w", i, err)
				close(w.progress)
				return
			}
			w.written.Add(1)
			select {
			case w.progress <- struct{}{}:
			default:
			}
		}
	}()
	return w
}

// wait returns once n more files were written, failing t when the writer
// fails or stalls.
func (w *syncedWriter) wait(t *testing.T, n int64) {
	t.Helper()
	target := w.written.Load() + n
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for w.written.Load() < target {
		select {
		case _, ok := <-w.progress:
			if !ok {
				t.Fatalf("the writer saw an error: %v", w.err)
			}
		case <-ctx.Done():
			t.Fatalf("the writer stalled at %d files", w.written.Load())
		}
	}
}

// finish stops the writer and returns how many files it wrote.
func (w *syncedWriter) finish(t *testing.T) int {
	t.Helper()
	close(w.stop)
	w.wg.Wait()
	if w.err != nil {
		t.Fatalf("the writer saw an error: %v", w.err)
	}
	return int(w.written.Load())
}

// testStackReattachAfterKill (in the VM): a stack with snapshots is
// attached, ext4 mounted on it and a writer fsyncs files into it. The
// attach process is SIGKILLed again and again; each time `ploopctl attach
// --reattach` repairs the top delta's in-use mark, reopens the stack and
// hands the kernel fresh sockets within the dead-connection timeout. A
// snapshot is taken through the new process's control socket after every
// other restart, so the stack the restarts reopen keeps growing. Pass: the
// writer never sees an error, the filesystem stays read-write, every file
// reads back, fsck is clean and every delta passes qemu-img check.
func testStackReattachAfterKill(t *testing.T) {
	restarts := 6
	if testing.Short() {
		restarts = 3
	}
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "vol")
	guestMust(t, guestPloopctl(), "init", "-s", "256M", "--cluster-size", "64K", dir)
	// A short request timeout gets a request that was in flight at the
	// kill retried soon on a fresh connection.
	args := []string{"--id", "pvc-reattach", "--connections", "2", "--timeout", "5s", "--dead-conn-timeout", "120s", dir}
	dev, cmd, stderr := startAttach(t, args...)
	defer func() {
		if cmd != nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	guestMust(t, "mkfs.ext4", "-q", dev)
	mnt := filepath.Join(tmp, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	guestMust(t, "mount", dev, mnt)
	mounted := true
	defer func() {
		if mounted {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	}()
	if err := writeSynced(filepath.Join(mnt, "before-snapshot"), filePattern(-1, 1<<20)); err != nil {
		t.Fatal(err)
	}
	// Frozen, so that the first snapshot holds a clean filesystem.
	guestMust(t, "fsfreeze", "-f", mnt)
	snaps := []string{strings.TrimSpace(guestMust(t, guestPloopctl(), "snapshot", dir))}
	guestMust(t, "fsfreeze", "-u", mnt)

	const size = 128 << 10
	w := startWriter(mnt, size)
	for rep := range restarts {
		w.wait(t, 5)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		cmd.Wait()
		if rep > 0 {
			logReattach(t, rep, stderr)
		}
		start := time.Now()
		var again string
		again, cmd, stderr = startAttach(t, append([]string{"--reattach"}, args...)...)
		took := time.Since(start)
		if again != dev {
			t.Fatalf("reattach %d took over %s, want %s", rep+1, again, dev)
		}
		w.wait(t, 3)
		t.Logf("restart %d: %s reattached in %v, writes resumed after %v (%d files so far)",
			rep+1, dev, took.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), w.written.Load())
		if rep%2 == 1 {
			snaps = append(snaps, strings.TrimSpace(guestMust(t, guestPloopctl(), "snapshot", dir)))
		}
	}
	n := w.finish(t)
	if opts := mountOptions(t, mnt); !strings.HasPrefix(opts, "rw") {
		t.Fatalf("the filesystem is now %q: it went read-only", opts)
	}
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("f%05d", i)))
		if err != nil || !bytes.Equal(got, filePattern(i, size)) {
			t.Errorf("file %d after %d restarts: %d bytes, %v, content equal: %v", i, restarts, len(got), err, bytes.Equal(got, filePattern(i, size)))
		}
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false
	guestMust(t, "e2fsck", "-fn", dev)
	guestMust(t, guestPloopctl(), "detach", dev)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the last attach exited with %v after detach; stderr: %s", err, stderr)
	}
	cmd = nil
	logReattach(t, restarts, stderr)
	guestMust(t, guestPloopctl(), "check", dir)
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	chain := d.Chain()
	if len(chain) != len(snaps)+1 {
		t.Fatalf("the stack has %d deltas, want %d (%d snapshots)", len(chain), len(snaps)+1, len(snaps))
	}
	for _, im := range chain {
		guestMust(t, "qemu-img", "check", "-f", "parallels", filepath.Join(dir, im.File))
	}
	// The first snapshot holds a clean filesystem with the one file
	// written before it.
	snapRaw := filepath.Join(tmp, "snap.raw")
	guestMust(t, guestPloopctl(), "convert", "-u", snaps[0], dir, snapRaw)
	guestMust(t, "e2fsck", "-fn", snapRaw)
	t.Logf("%d fsync'ed files written across %d SIGKILLs and reattaches of a stack of %d deltas", n, restarts, len(chain))
}

func mountOptions(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 4 && f[1] == dir {
			return f[3]
		}
	}
	t.Fatalf("%s is not mounted", dir)
	return ""
}

// logReattach logs what the library said about reattach rep, from the
// stderr of its process, which has exited.
func logReattach(t *testing.T, rep int, stderr *bytes.Buffer) {
	t.Helper()
	for _, l := range strings.Split(stderr.String(), "\n") {
		if strings.Contains(l, "reattached volume") || strings.Contains(l, "repaired stack") {
			t.Logf("restart %d: %s", rep, l)
		}
	}
}
