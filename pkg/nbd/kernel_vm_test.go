package nbd_test

// Kernel-facing tests: they boot one VM (test/e2e/vmtest) and run every
// case in it against the real nbd driver. The restart-survival case runs
// the server in a separate helper process (this test binary re-executed
// with nbdHelperEnv set) so that it can be SIGKILLed.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"io"
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

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
	"golang.org/x/sys/unix"
)

const nbdHelperEnv = "PLOOP_CSI_NBD_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(nbdHelperEnv) != "" {
		os.Exit(helperMain())
	}
	os.Exit(m.Run())
}

func TestKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Timeout: 20 * time.Minute}, []vmtest.Case{
		{Name: "AttachMkfsMount", Run: testAttachMkfsMount},
		{Name: "OnlineResize", Run: testOnlineResize},
		{Name: "DisconnectIdempotent", Run: testDisconnectIdempotent},
		{Name: "DisconnectWhileMounted", Run: testDisconnectWhileMounted},
		{Name: "ReattachAfterDisconnect", Run: testReattachAfterDisconnect},
		{Name: "RestartSurvival", Run: testRestartSurvival},
		{Name: "AckedWriteSurvivesKill", Run: testAckedWriteSurvivesKill},
		{Name: "PanicIsolation", Run: testPanicIsolation},
		{Name: "SlowRequest", Run: testSlowRequest},
		{Name: "StaleWriteAfterResend", Run: testStaleWriteAfterResend},
		{Name: "RestartWithDefaults", Run: testRestartWithDefaults},
	})
}

func openKernel(t *testing.T) *nbd.Kernel {
	t.Helper()
	k, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k
}

func attach(t *testing.T, k *nbd.Kernel, b nbd.Backend, id string) *nbd.Attachment {
	t.Helper()
	srv, err := nbd.NewServer(nbd.Export{Name: id, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	att, err := k.Connect(ctx, srv, nbd.AttachOptions{BackendID: id, Index: nbd.AnyDevice, Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := att.Disconnect(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return att
}

func disconnect(t *testing.T, att *nbd.Attachment) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := att.Disconnect(ctx); err != nil {
		t.Fatal(err)
	}
}

func mount(t *testing.T, dev, dir string, opts ...string) {
	t.Helper()
	args := []string{dev, dir}
	if len(opts) > 0 {
		args = append([]string{"-o", strings.Join(opts, ",")}, args...)
	}
	testcmd.Combined(t, "mount", args...)
}

func umount(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatalf("umount %s: %v", dir, err)
	}
}

// pattern is the deterministic content of test file i.
func pattern(i, size int) []byte {
	r := rand.New(rand.NewPCG(uint64(i), 42))
	b := make([]byte, size)
	for j := 0; j+8 <= size; j += 8 {
		v := r.Uint64()
		for k := 0; k < 8; k++ {
			b[j+k] = byte(v >> (8 * k))
		}
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

func dropCaches(t *testing.T) {
	t.Helper()
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		t.Fatal(err)
	}
}

func verifyFiles(t *testing.T, dir string, n, size int) {
	t.Helper()
	for i := 0; i < n; i++ {
		got, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)))
		if err != nil {
			t.Errorf("file %d: %v", i, err)
			continue
		}
		if !bytes.Equal(got, pattern(i, size)) {
			t.Errorf("file %d: content differs", i)
		}
	}
}

func testAttachMkfsMount(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	k := openKernel(t)
	const id = "test-attach-mkfs"
	att := attach(t, k, img, id)
	if got, err := os.ReadFile("/sys/block/" + filepath.Base(att.Path()) + "/backend"); err != nil || strings.TrimSpace(string(got)) != id {
		t.Fatalf("sysfs backend = %q, %v", got, err)
	}
	if i, err := nbd.FindBackend(id); err != nil || i != att.Index() {
		t.Fatalf("FindBackend = %d, %v; want %d", i, err, att.Index())
	}
	if ok, err := k.Status(att.Index()); err != nil || !ok {
		t.Fatalf("Status = %v, %v; want connected", ok, err)
	}
	testcmd.Combined(t, "mkfs.ext4", "-q", att.Path())
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	mount(t, att.Path(), mnt)
	const files, size = 40, 1 << 20
	for i := 0; i < files; i++ {
		if err := writeSynced(filepath.Join(mnt, fmt.Sprintf("f%05d", i)), pattern(i, size)); err != nil {
			t.Fatal(err)
		}
	}
	umount(t, mnt)
	disconnect(t, att)
	if ok, err := k.Status(att.Index()); err != nil || ok {
		t.Fatalf("after Disconnect: Status = %v, %v; want disconnected", ok, err)
	}
	if _, err := nbd.FindBackend(id); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after Disconnect the backend is still listed: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "qemu-img", "check", "-f", "parallels", path)

	// Content check through a fresh attach, after fsck.
	img, err = ploop.Open(path, ploop.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	att = attach(t, k, img, id)
	testcmd.Combined(t, "e2fsck", "-fn", att.Path())
	mount(t, att.Path(), mnt, "ro")
	verifyFiles(t, mnt, files, size)
	umount(t, mnt)
	disconnect(t, att)
}

// growFile is a raw file whose size follows the file, so a test can grow
// it under a live device.
type growFile struct{ f *os.File }

func (g growFile) Size() int64 {
	fi, err := g.f.Stat()
	if err != nil {
		return 0
	}
	return fi.Size()
}
func (g growFile) ReadAt(p []byte, off int64) (int, error)  { return g.f.ReadAt(p, off) }
func (g growFile) WriteAt(p []byte, off int64) (int, error) { return g.f.WriteAt(p, off) }
func (g growFile) Flush() error                             { return g.f.Sync() }
func (g growFile) Discard(off, n int64) error {
	return unix.Fallocate(int(g.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (g growFile) WriteZeroes(off, n int64, _ bool) error { return g.Discard(off, n) }
func (g growFile) Extent(off, n int64) (int64, bool, error) {
	return n, true, nil
}
func (g growFile) ReadOnly() bool { return false }

func testOnlineResize(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "grow.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(128 << 20); err != nil {
		t.Fatal(err)
	}
	k := openKernel(t)
	att := attach(t, k, growFile{f}, "test-resize")
	testcmd.Combined(t, "mkfs.ext4", "-q", att.Path())
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	mount(t, att.Path(), mnt)
	before := fsBlocks(t, mnt)

	if err := f.Truncate(256 << 20); err != nil {
		t.Fatal(err)
	}
	if err := att.Resize(256 << 20); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/sys/block/" + filepath.Base(att.Path()) + "/size")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != strconv.Itoa(256<<20/512) {
		t.Fatalf("/sys/block/%s/size = %s sectors, want %d", filepath.Base(att.Path()), got, 256<<20/512)
	}
	testcmd.Combined(t, "resize2fs", att.Path())
	after := fsBlocks(t, mnt)
	if after < before*19/10 {
		t.Fatalf("filesystem grew from %d to %d blocks, want about double", before, after)
	}
	if err := writeSynced(filepath.Join(mnt, "after-grow"), pattern(1, 64<<20)); err != nil {
		t.Fatal(err)
	}
	umount(t, mnt)
	testcmd.Combined(t, "e2fsck", "-fn", att.Path())
	if err := att.Resize(1000); err == nil {
		t.Error("Resize to a size that is not a multiple of 4096 succeeded")
	}
	disconnect(t, att)
}

func fsBlocks(t *testing.T, dir string) uint64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

func testDisconnectIdempotent(t *testing.T) {
	b, err := os.Create(filepath.Join(t.TempDir(), "d.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	b.Truncate(16 << 20)
	k := openKernel(t)
	att := attach(t, k, growFile{b}, "test-idempotent")
	disconnect(t, att)
	disconnect(t, att)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := k.Disconnect(ctx, att.Index()); err != nil {
		t.Fatalf("Disconnect of a free device: %v", err)
	}
	devs, err := k.ConnectedDevices()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if d == att.Index() {
			t.Fatalf("%s still connected", att.Path())
		}
	}
}

// helper is a serving process started by the restart test.
type helper struct {
	cmd *exec.Cmd
	dev string
	// lines are what it prints after "ready".
	lines <-chan string
}

// startHelper starts a serving process; env adds NBD_HELPER_DEFAULTS=1
// (attach with the default options) or NBD_HELPER_HOLD=OFFSET (never
// finish a write at OFFSET, printing "held" when one arrives).
func startHelper(t *testing.T, image, id, mode string, env ...string) *helper {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), nbdHelperEnv+"="+mode, "NBD_HELPER_IMAGE="+image, "NBD_HELPER_ID="+id)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 16)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default: // nobody listens
			}
		}
		io.Copy(io.Discard, out)
	}()
	select {
	case l := <-lines:
		dev, ok := strings.CutPrefix(strings.TrimSpace(l), "ready ")
		if !ok {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper (%s) failed to start: %q", mode, l)
		}
		return &helper{cmd: cmd, dev: dev, lines: lines}
	case <-time.After(90 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper (%s) not ready after 90s", mode)
	}
	return nil
}

// helperMain serves an image to the kernel: "connect" attaches it,
// "reattach" takes over the device of a killed predecessor. It prints
// "ready /dev/nbdN" and serves until SIGTERM, then disconnects.
func helperMain() int {
	mode, path, id := os.Getenv(nbdHelperEnv), os.Getenv("NBD_HELPER_IMAGE"), os.Getenv("NBD_HELPER_ID")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "helper:", err)
		fmt.Println("failed")
		return 1
	}
	img, err := ploop.Open(path, ploop.OpenOptions{})
	if errors.Is(err, ploop.ErrInUse) {
		// The predecessor was killed with the image open.
		if _, err = ploop.Repair(path); err == nil {
			img, err = ploop.Open(path, ploop.OpenOptions{})
		}
	}
	if err != nil {
		return fail(err)
	}
	defer img.Close()
	var backend nbd.Backend = img
	if off := os.Getenv("NBD_HELPER_HOLD"); off != "" {
		o, err := strconv.ParseInt(off, 10, 64)
		if err != nil {
			return fail(err)
		}
		backend = &stuckWrite{Backend: img, off: o}
	}
	srv, err := nbd.NewServer(nbd.Export{Name: id, Backend: backend})
	if err != nil {
		return fail(err)
	}
	k, err := nbd.OpenKernel()
	if err != nil {
		return fail(err)
	}
	defer k.Close()
	opts := nbd.AttachOptions{
		BackendID: id, Index: nbd.AnyDevice, Connections: 2,
		// A request in flight when the server died is retried after
		// Timeout; short keeps the test fast.
		Timeout: 5 * time.Second, DeadConnTimeout: 120 * time.Second,
	}
	if os.Getenv("NBD_HELPER_DEFAULTS") == "1" {
		opts = nbd.AttachOptions{BackendID: id, Index: nbd.AnyDevice}
	}
	actx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var att *nbd.Attachment
	if mode == "reattach" {
		att, err = k.Reattach(actx, srv, opts)
	} else {
		att, err = k.Connect(actx, srv, opts)
	}
	if err != nil {
		return fail(err)
	}
	fmt.Println("ready", att.Path())
	<-ctx.Done()
	dctx, dcancel := context.WithTimeout(context.Background(), time.Minute)
	defer dcancel()
	if err := att.Disconnect(dctx); err != nil {
		return fail(err)
	}
	if err := img.Flush(); err != nil {
		return fail(err)
	}
	return 0
}

// stuckWrite never finishes a write at off: the process is killed with
// the write in flight.
type stuckWrite struct {
	nbd.Backend
	off int64
}

func (s *stuckWrite) WriteAt(p []byte, off int64) (int, error) {
	if off == s.off {
		fmt.Println("held")
		select {}
	}
	return s.Backend.WriteAt(p, off)
}

// testRestartWithDefaults: with the default attach options (one
// connection, no kernel timeout) a write in flight when the server is
// killed still completes, without error, once a new server has
// re-attached: the kernel resends it at its next 30 s block-layer tick
// because the connection it was sent on was replaced.
func testRestartWithDefaults(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	const id, off = "test-restart-defaults", 8 << 20
	h := startHelper(t, path, id, "connect", "NBD_HELPER_DEFAULTS=1", "NBD_HELPER_HOLD="+strconv.Itoa(off))
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(h.dev, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		if err != nil {
			done <- err
			return
		}
		defer unix.Munmap(buf)
		copy(buf, pattern(30, 4096))
		_, err = f.WriteAt(buf, off)
		done <- err
	}()
	select {
	case l := <-h.lines:
		if l != "held" {
			t.Fatalf("helper said %q", l)
		}
	case <-time.After(time.Minute):
		t.Fatal("the write never reached the server")
	}
	h.cmd.Process.Signal(syscall.SIGKILL)
	h.cmd.Wait()
	killed := time.Now()
	h = startHelper(t, path, id, "reattach", "NBD_HELPER_DEFAULTS=1")
	reattached := time.Since(killed)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the write in flight at the kill failed: %v", err)
		}
	case <-time.After(3 * time.Minute):
		t.Fatal("the write in flight at the kill never completed")
	}
	t.Logf("reattached %v after the kill; the write in flight completed %v after the kill", reattached.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
	f, err := os.OpenFile(h.dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	_, err = f.ReadAt(buf, off)
	f.Close()
	if err != nil || !bytes.Equal(buf, pattern(30, 4096)) {
		t.Fatalf("read back: %v, data equal %v", err, bytes.Equal(buf, pattern(30, 4096)))
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	if err := h.cmd.Wait(); err != nil {
		t.Fatalf("helper did not shut down cleanly: %v", err)
	}
}

func testRestartSurvival(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: 512 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	const id = "test-restart"
	h := startHelper(t, path, id, "connect")
	testcmd.Combined(t, "mkfs.ext4", "-q", h.dev)
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	mount(t, h.dev, mnt)

	// The writer makes fsync'ed files until told to stop; every error is
	// a failure of the restart path.
	const size = 128 << 10
	var written atomic.Int64
	var writeErr error
	progress := make(chan struct{}, 1)
	stopWriter := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stopWriter:
				return
			default:
			}
			if err := writeSynced(filepath.Join(mnt, fmt.Sprintf("f%05d", i)), pattern(i, size)); err != nil {
				writeErr = fmt.Errorf("file %d: %w", i, err)
				close(progress)
				return
			}
			written.Add(1)
			select {
			case progress <- struct{}{}:
			default:
			}
		}
	}()
	waitWrites := func(n int64) {
		t.Helper()
		target := written.Load() + n
		deadline := time.After(3 * time.Minute)
		for written.Load() < target {
			select {
			case _, ok := <-progress:
				if !ok {
					t.Fatalf("writer failed: %v", writeErr)
				}
			case <-deadline:
				t.Fatalf("writer stalled at %d files", written.Load())
			}
		}
	}

	for rep := 0; rep < 10; rep++ {
		waitWrites(5)
		if err := h.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		h.cmd.Wait()
		start := time.Now()
		h = startHelper(t, path, id, "reattach")
		waitWrites(3)
		t.Logf("restart %d: reattached %s, writes resumed after %v (%d files so far)", rep+1, h.dev, time.Since(start).Round(time.Millisecond), written.Load())
	}
	close(stopWriter)
	wg.Wait()
	if writeErr != nil {
		t.Fatalf("writer saw an error: %v", writeErr)
	}
	if m := mountOptions(t, mnt); !strings.HasPrefix(m, "rw") {
		t.Fatalf("filesystem options now %q: it went read-only", m)
	}
	n := int(written.Load())
	dropCaches(t)
	verifyFiles(t, mnt, n, size)
	umount(t, mnt)
	testcmd.Combined(t, "e2fsck", "-fn", h.dev)
	h.cmd.Process.Signal(syscall.SIGTERM)
	if err := h.cmd.Wait(); err != nil {
		t.Fatalf("helper did not shut down cleanly: %v", err)
	}
	testcmd.Combined(t, "qemu-img", "check", "-f", "parallels", path)
	t.Logf("%d fsync'ed files written across 10 server restarts", n)
}

func mountOptions(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) >= 4 && f[1] == dir {
			return f[3]
		}
	}
	t.Fatalf("%s is not mounted", dir)
	return ""
}
