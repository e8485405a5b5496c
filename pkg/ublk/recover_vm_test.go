package ublk_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
)

// helperMain serves the file $PLOOP_CSI_UBLK_FILE (a ploop image or a raw
// file) through a
// recoverable device tagged $PLOOP_CSI_UBLK_TAG: a new one ("serve"), or
// the one a killed helper left ("recover"), inline when
// $PLOOP_CSI_UBLK_INLINE is 1. It prints "ready ID" and
// serves until SIGTERM, then closes the device.
func helperMain(mode string) int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "ublk helper:", err); return 1 }
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	tag, err := strconv.ParseUint(os.Getenv("PLOOP_CSI_UBLK_TAG"), 10, 64)
	if err != nil {
		return fail(err)
	}
	backend, closeBackend, err := openBackend(os.Getenv("PLOOP_CSI_UBLK_FILE"))
	if err != nil {
		return fail(err)
	}
	defer closeBackend()
	c, err := ublk.OpenControl()
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	inline := os.Getenv("PLOOP_CSI_UBLK_INLINE") == "1"
	var d *ublk.Device
	switch mode {
	case "serve":
		d, err = ublk.Create(c, backend, ublk.Options{Queues: 2, Depth: 16, Recoverable: os.Getenv("PLOOP_CSI_UBLK_NORECOVER") == "", Tag: tag, Inline: inline})
	case "recover":
		var found []ublk.DevInfo
		if found, err = c.Find(tag); err == nil && len(found) != 1 {
			err = fmt.Errorf("%d devices with tag %d, want 1", len(found), tag)
		}
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			d, err = ublk.Recover(ctx, c, found[0].ID, backend, ublk.Options{Inline: inline})
			cancel()
		}
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	if err != nil {
		return fail(err)
	}
	fmt.Printf("ready %d\n", d.ID())
	<-term
	if err := d.Close(); err != nil {
		return fail(err)
	}
	if err := d.Err(); err != nil {
		return fail(err)
	}
	return 0
}

// openBackend opens a ploop image (.hds), repairing the in-use mark a
// killed server left, or a raw file.
func openBackend(path string) (ublk.Backend, func() error, error) {
	if !strings.HasSuffix(path, ".hds") {
		raw, err := ploop.OpenRaw(path, false)
		if err != nil {
			return nil, nil, err
		}
		return raw, raw.Close, nil
	}
	img, err := ploop.Open(path, ploop.OpenOptions{})
	if errors.Is(err, ploop.ErrInUse) {
		if _, err = ploop.Repair(path); err == nil {
			img, err = ploop.Open(path, ploop.OpenOptions{})
		}
	}
	if err != nil {
		return nil, nil, err
	}
	return img, img.Close, nil
}

type helper struct {
	cmd *exec.Cmd
	id  uint32
}

func startHelper(t *testing.T, mode, file string, tag uint64, env ...string) *helper {
	t.Helper()
	cmd := testcmd.Child("TestKernel", append(env, helperEnv+"="+mode, "PLOOP_CSI_UBLK_FILE="+file, "PLOOP_CSI_UBLK_TAG="+strconv.FormatUint(tag, 10))...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	id, perr := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(line), "ready "), 10, 32)
	if err != nil || perr != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("ublk helper (%s) did not get ready: %q %v %v", mode, line, err, perr)
	}
	return &helper{cmd: cmd, id: uint32(id)}
}

// testRecoverAfterKill: four writers with direct I/O on a recoverable
// device while its server is SIGKILLed three times, each time taken over
// by a new process with Recover. The writers see no error, and every
// write they were told was done reads back, through the device and in
// the backing file.
func testRecoverAfterKill(t *testing.T) {
	const size, writers, kills = 32 << 20, 4, 6
	raw := rawFile(t, size)
	path := raw.Path()
	raw.Close() // the helpers serve it
	tag := rand.Uint64()
	c := openControl(t)
	h := startHelper(t, "serve", path, tag)
	defer func() {
		if h.cmd.ProcessState == nil {
			h.cmd.Process.Kill()
			h.cmd.Wait()
		}
	}()
	var stop atomic.Bool
	var wg sync.WaitGroup
	t.Cleanup(func() {
		// On failure: a device whose server is dead holds its writers
		// until it is stopped, which fails their requests.
		stop.Store(true)
		c.Stop(h.id)
		c.Delete(h.id)
		wg.Wait()
	})
	devPath := fmt.Sprintf("/dev/ublkb%d", h.id)
	dev, err := os.OpenFile(devPath, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()

	model := make([]byte, size)
	var writes, failures atomic.Int64
	var firstErr atomic.Value
	region := size / writers
	for w := range writers {
		buf := alignedBuf(t, 64<<10)
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), tag))
			for !stop.Load() {
				n := (1 + r.IntN(16)) << 12
				off := w*region + r.IntN((region-n)>>12+1)<<12
				for i := range buf[:n] {
					buf[i] = byte(r.Uint32())
				}
				if _, err := dev.WriteAt(buf[:n], int64(off)); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				copy(model[off:], buf[:n])
				writes.Add(1)
			}
		}()
	}
	for k := range kills {
		target := writes.Load() + 100
		testcmd.WaitFor(t, 2*time.Minute, "100 more writes", func() (bool, error) { return writes.Load() >= target, nil })
		if err := h.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		h.cmd.Wait()
		killed := time.Now()
		testcmd.WaitFor(t, time.Minute, "the device quiesced", func() (bool, error) {
			info, err := c.Info(h.id)
			return err == nil && info.State == ublk.StateQuiesced, err
		})
		before := writes.Load()
		// Every other server serves inline, so both ways see requests
		// reissued.
		var env []string
		if k%2 == 0 {
			env = append(env, "PLOOP_CSI_UBLK_INLINE=1")
		}
		h = startHelper(t, "recover", path, tag, env...)
		t.Logf("kill %d: recovered in %v; %d writes done before it", k+1, time.Since(killed).Round(time.Millisecond), before)
		if want := fmt.Sprintf("/dev/ublkb%d", h.id); want != devPath {
			t.Fatalf("recovered %s, want %s", want, devPath)
		}
	}
	target := writes.Load() + 100
	testcmd.WaitFor(t, 2*time.Minute, "100 writes after the last recovery", func() (bool, error) { return writes.Load() >= target, nil })
	stop.Store(true)
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d writes failed across %d kills, the first: %v", n, kills, firstErr.Load())
	}
	t.Logf("%d writes, none failed, across %d kills", writes.Load(), kills)
	if err := dev.Sync(); err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(t, 1<<20)
	for off := 0; off < size; off += len(buf) {
		if _, err := dev.ReadAt(buf, int64(off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, model[off:off+len(buf)]) {
			t.Fatalf("the MiB at %d differs from what was written", off)
		}
	}
	dev.Close()
	h.cmd.Process.Signal(syscall.SIGTERM)
	if err := h.cmd.Wait(); err != nil {
		t.Fatalf("helper's close: %v", err)
	}
	if _, err := os.Stat(devPath); !os.IsNotExist(err) {
		t.Errorf("%s left after close: %v", devPath, err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(model) {
		t.Fatal("the backing file differs from what was written")
	}
}

// testRemoveDeadServer: a device whose server died, with writers blocked
// on it, is removed from another process (as a node plugin that gives up
// on a volume would): the writers get errors, not a hang, and nothing of
// the device is left.
func testRemoveDeadServer(t *testing.T) {
	for _, recoverable := range []bool{true, false} {
		t.Run(fmt.Sprintf("recoverable=%v", recoverable), func(t *testing.T) {
			raw := rawFile(t, 8<<20)
			path := raw.Path()
			raw.Close()
			c := openControl(t)
			var env []string
			if !recoverable {
				env = append(env, "PLOOP_CSI_UBLK_NORECOVER=1")
			}
			h := startHelper(t, "serve", path, rand.Uint64(), env...)
			dev, err := os.OpenFile(fmt.Sprintf("/dev/ublkb%d", h.id), os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Close()
			h.cmd.Process.Kill()
			h.cmd.Wait()
			done := make(chan error, 1)
			go func() {
				buf := alignedBuf(t, 4096)
				_, err := dev.WriteAt(buf, 0)
				done <- err
			}()
			testcmd.WaitFor(t, time.Minute, "the kernel to see the server's death", func() (bool, error) {
				info, err := c.Info(h.id)
				return err == nil && info.State != ublk.StateLive, err
			})
			stopped := make(chan error, 1)
			go func() { stopped <- c.Stop(h.id) }()
			select {
			case err := <-stopped:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(time.Minute):
				t.Fatal("stop of a device whose server died hung for a minute")
			}
			select {
			case err := <-done:
				if err == nil {
					t.Error("a write to a device whose server died succeeded")
				}
				t.Logf("the blocked write: %v", err)
			case <-time.After(time.Minute):
				t.Fatal("a write to a stopped device still hangs after a minute")
			}
			// The kernel frees the device when its last user lets go.
			dev.Close()
			if err := c.Delete(h.id); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Info(h.id); !errors.Is(err, unix.ENODEV) {
				t.Errorf("device still there after delete: %v", err)
			}
		})
	}
}

// testRecoverPloopExt4: ext4 on a ploop image served through ublk; a
// writer creates files and fsyncs each while the server is killed three
// times and the image taken over (its in-use mark repaired) by a new
// process. No file operation fails, fsck finds the filesystem clean, every
// file reads back after a fresh mount, and qemu-img finds the image clean.
func testRecoverPloopExt4(t *testing.T) {
	const kills = 3
	path := filepath.Join(t.TempDir(), "root.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	tag := rand.Uint64()
	c := openControl(t)
	h := startHelper(t, "serve", path, tag)
	var stop atomic.Bool
	var wg sync.WaitGroup
	mnt := t.TempDir()
	t.Cleanup(func() {
		stop.Store(true)
		if h.cmd.ProcessState != nil { // killed: fail what it holds
			c.Stop(h.id)
		}
		wg.Wait()
		unix.Unmount(mnt, unix.MNT_DETACH)
		if h.cmd.ProcessState == nil {
			h.cmd.Process.Kill()
			h.cmd.Wait()
		}
		c.Stop(h.id)
		c.Delete(h.id)
	})
	devPath := fmt.Sprintf("/dev/ublkb%d", h.id)
	testcmd.Combined(t, "mkfs.ext4", "-q", devPath)
	testcmd.Combined(t, "mount", devPath, mnt)

	var files, failures atomic.Int64
	var firstErr atomic.Value
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			err := writeSynced(filepath.Join(mnt, fmt.Sprintf("f%05d", i)), pattern(i, 64<<10))
			if err != nil {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, err)
				return
			}
			files.Add(1)
		}
	}()
	for k := range kills {
		target := files.Load() + 20
		testcmd.WaitFor(t, 2*time.Minute, "20 more files", func() (bool, error) { return files.Load() >= target || failures.Load() > 0, nil })
		if err := h.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		h.cmd.Wait()
		killed := time.Now()
		var env []string
		if k%2 == 0 {
			env = append(env, "PLOOP_CSI_UBLK_INLINE=1")
		}
		h = startHelper(t, "recover", path, tag, env...)
		t.Logf("kill %d: recovered in %v with %d files written", k+1, time.Since(killed).Round(time.Millisecond), files.Load())
	}
	target := files.Load() + 20
	testcmd.WaitFor(t, 2*time.Minute, "20 files after the last recovery", func() (bool, error) { return files.Load() >= target || failures.Load() > 0, nil })
	stop.Store(true)
	wg.Wait()
	if failures.Load() != 0 {
		t.Fatalf("a file write failed across the kills: %v", firstErr.Load())
	}
	// Read back from the device, not the page cache: a fresh mount.
	testcmd.Combined(t, "umount", mnt)
	testcmd.Combined(t, "fsck.ext4", "-fn", devPath)
	testcmd.Combined(t, "mount", "-o", "ro", devPath, mnt)
	n := int(files.Load())
	for i := range n {
		got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("f%05d", i)))
		if err != nil || !bytes.Equal(got, pattern(i, 64<<10)) {
			t.Fatalf("file %d of %d: %d bytes, %v", i, n, len(got), err)
		}
	}
	t.Logf("%d files written and read back across %d kills", n, kills)
	testcmd.Combined(t, "umount", mnt)
	h.cmd.Process.Signal(syscall.SIGTERM)
	if err := h.cmd.Wait(); err != nil {
		t.Fatalf("helper's close: %v", err)
	}
	testcmd.Combined(t, "qemu-img", "check", "-f", "parallels", path)
}

// pattern is the deterministic content of file i.
func pattern(i, size int) []byte {
	r := rand.New(rand.NewPCG(uint64(i), 42))
	b := make([]byte, size)
	for j := range b {
		b[j] = byte(r.Uint32())
	}
	return b
}

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

// testSelfTestSweeps: the device of a self-test whose process was killed
// (a server without recovery, as the self-test's is) is removed by the
// next self-test, which then passes and leaves nothing behind.
func testSelfTestSweeps(t *testing.T) {
	raw := rawFile(t, 1<<20)
	path := raw.Path()
	raw.Close()
	c := openControl(t)
	h := startHelper(t, "serve", path, ublk.SelfTestTag, "PLOOP_CSI_UBLK_NORECOVER=1")
	h.cmd.Process.Kill()
	h.cmd.Wait()
	testcmd.WaitFor(t, time.Minute, "the kernel to see the killed self-test's server die", func() (bool, error) {
		info, err := c.Info(h.id)
		return err == nil && info.State != ublk.StateLive, err
	})
	if err := ublk.SelfTest(c); err != nil {
		t.Fatalf("self-test with a leftover: %v", err)
	}
	left, err := c.Find(ublk.SelfTestTag)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Fatalf("self-test devices left after a self-test: %+v", left)
	}
}
