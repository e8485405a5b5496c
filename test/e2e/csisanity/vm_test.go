package csisanity

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// attachmentsWired says whether cmd/ploop-csi serves the node with
// pkg/attachments. Until it does, node calls fail by design and the sanity
// cases would only show that; whoever wires the attachments in sets this to
// true, and then the five sets must pass in CI. PLOOP_CSI_SANITY_UNWIRED=1
// runs them anyway, to see how far the controller side gets.
const attachmentsWired = false

// TestSanityChild runs the suite when Run starts this binary as its child.
func TestSanityChild(t *testing.T) { Child(t) }

// TestKernel runs the real ploop-csi binary in mode all inside the test VM
// (real nbd, mkfs, mounts and project quota): Probe against a root that
// fills up and turns read-only, and csi-sanity for the five parameter sets
// of Sets, each on a fresh storage root, each leaving nothing behind.
func TestKernel(t *testing.T) {
	if InChild() {
		t.Skip("running as csi-sanity's child")
	}
	cases := []vmtest.Case{{Name: "Probe", Run: testProbe}}
	sanity := attachmentsWired || os.Getenv("PLOOP_CSI_SANITY_UNWIRED") == "1"
	if sanity {
		for _, set := range Sets() {
			cases = append(cases, vmtest.Case{Name: "Sanity_" + set.Name, Run: func(t *testing.T) { testSanity(t, set) }})
		}
	} else if !vmtest.InGuest() {
		t.Run("Sanity", func(t *testing.T) {
			t.Skip("pkg/attachments is not wired into cmd/ploop-csi yet (attachmentsWired); PLOOP_CSI_SANITY_UNWIRED=1 runs the sets anyway")
		})
	}
	vmtest.Run(t, vmtest.Options{Timeout: 50 * time.Minute, Prepare: buildDriver}, cases)
}

// buildDriver builds ploop-csi into the exchange directory.
func buildDriver(xchg string) error {
	out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v0.0.0-vmtest", "-o", filepath.Join(xchg, "ploop-csi"),
		"github.com/ploop-csi/ploop-csi/cmd/ploop-csi").CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build ploop-csi: %v\n%s", err, out)
	}
	return nil
}

// driverProc is a running ploop-csi.
type driverProc struct {
	cmd  *exec.Cmd
	out  *bytes.Buffer
	sock string
	conn *grpc.ClientConn
}

// startDriver runs ploop-csi in mode all on root and waits until it
// answers Probe.
func startDriver(t *testing.T, ctx context.Context, root, work string, extra ...string) *driverProc {
	t.Helper()
	d := &driverProc{out: &bytes.Buffer{}, sock: filepath.Join(work, "csi.sock")}
	args := append([]string{"--nodeid", "sanity-vm", "--storage-root", root, "--endpoint", "unix://" + d.sock, "--v", "2"}, extra...)
	d.cmd = exec.Command(filepath.Join(vmtest.ExchangeDir(), "ploop-csi"), args...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Kill()
			d.cmd.Wait()
		}
		if t.Failed() {
			t.Logf("ploop-csi log:\n%s", tail(d.out.String(), 200))
		}
	})
	var err error
	d.conn, err = grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.conn.Close() })
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := csi.NewIdentityClient(d.conn).Probe(wctx, &csi.ProbeRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("ploop-csi did not come up: %v\n%s", err, d.out.String())
	}
	return d
}

// stop sends SIGTERM and expects a clean exit.
func (d *driverProc) stop(t *testing.T) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Wait(); err != nil {
		t.Errorf("ploop-csi after SIGTERM: %v", err)
	}
	if _, err := os.Lstat(d.sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// testProbe: Probe answers ready on a usable root and fails with the reason
// while the root is full and after ext4 turned it read-only on an error.
func testProbe(t *testing.T) {
	ctx := testCtx(t, 5*time.Minute)
	mnt := vmtest.ScratchFS(t, "ext4", 256)
	root := filepath.Join(mnt, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	d := startDriver(t, ctx, root, t.TempDir())
	id := csi.NewIdentityClient(d.conn)
	probe := func(want codes.Code, substr string) {
		t.Helper()
		_, err := id.Probe(ctx, &csi.ProbeRequest{})
		if status.Code(err) != want || !strings.Contains(status.Convert(err).Message(), substr) {
			t.Fatalf("probe: %v, want %v saying %q", err, want, substr)
		}
	}
	probe(codes.OK, "")

	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(st.Bavail)*st.Bsize-(4<<20)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	probe(codes.FailedPrecondition, "full")
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	probe(codes.OK, "")

	// A read-only bind mount over the root: the root as the driver sees
	// it by path is read-only (the catalogue's open lock file keeps the
	// filesystem itself from being remounted read-only under it).
	for _, args := range [][]string{{"--bind", root, root}, {"-o", "remount,bind,ro", root}} {
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v %s", args, err, out)
		}
	}
	probe(codes.FailedPrecondition, "read-only")
	if err := unix.Unmount(root, 0); err != nil {
		t.Fatal(err)
	}
	probe(codes.OK, "")
	d.stop(t)
}

// testSanity runs csi-sanity for one set against the real driver on a
// fresh root, then checks the driver stops cleanly and leaves no volume,
// snapshot, mount or nbd connection behind.
func testSanity(t *testing.T, set Set) {
	ctx := testCtx(t, 40*time.Minute)
	mnt := vmtest.ScratchFS(t, set.RootFS, 1024)
	root := filepath.Join(mnt, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	work, err := os.MkdirTemp("/tmp", "sanity-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	// Thin volumes: the suite's volumes together are far larger than the
	// scratch root, and take almost nothing.
	d := startDriver(t, ctx, root, work, "--overcommit-ratio", "100", "--kubelet-dir", work)
	r := Run(ctx, t, "TestSanityChild", set, "unix://"+d.sock, work)
	r.Check(t)
	d.stop(t)

	for _, dir := range []string{"catalog/volumes", "catalog/snapshots", "ploop/volumes", "ploop/snapshots"} {
		if ents, err := os.ReadDir(filepath.Join(root, dir)); err != nil || len(ents) != 0 {
			t.Errorf("%s after the suite: %v %v", dir, names(ents), err)
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, work) || strings.Contains(l, root) {
				t.Errorf("mount left behind: %s", l)
			}
		}
	}
	pids, _ := filepath.Glob("/sys/block/nbd*/pid")
	if len(pids) != 0 {
		t.Errorf("nbd devices still connected: %v", pids)
	}
}

func names(ents []os.DirEntry) []string {
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}
