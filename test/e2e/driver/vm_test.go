// Package drivere2e proves the ploop-csi driver through its CSI gRPC API,
// against the real binary in mode all inside the test VM (real nbd, mkfs,
// mounts): the lifecycle checks of issue 11's "Driver tests in the VM,
// beyond sanity". One VM boot runs every case; each case has its own
// storage root on a scratch filesystem and its own driver process.
package drivere2e

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/test/e2e/csidriver"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestKernel runs the real ploop-csi in mode all inside the test VM.
func TestKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Timeout: 35 * time.Minute, MemoryMiB: 3072, Prepare: csidriver.Build}, []vmtest.Case{
		{Name: "KillUnderWriter", Run: testKillUnderWriter},
		{Name: "SnapshotWhileWriting", Run: func(t *testing.T) { testSnapshotWhileWriting(t, false) }},
		{Name: "DeleteSourceThenRestore", Run: func(t *testing.T) { testSnapshotWhileWriting(t, true) }},
		{Name: "OnlineExpand", Run: testOnlineExpand},
		{Name: "FillRoot", Run: testFillRoot},
		{Name: "Trim", Run: testTrim},
		{Name: "HostileIDs", Run: testHostileIDs},
		{Name: "Overcommit", Run: testOvercommit},
	})
}

// attachEnv carries the driver's --attach from TestKernelUblk to its
// cases.
const attachEnv = "PLOOP_CSI_TEST_ATTACH"

// TestKernelUblk runs the data-path cases again with the driver attaching
// through ublk (--attach=ublk), on the 6.12 kernel: kills under a writer
// (each successor takes the same /dev/ublkbN over with user recovery) and
// snapshots while writing.
func TestKernelUblk(t *testing.T) {
	overUblk := func(run func(*testing.T)) func(*testing.T) {
		return func(t *testing.T) {
			t.Setenv(attachEnv, "ublk")
			run(t)
		}
	}
	vmtest.Run(t, vmtest.Options{Kernel: vmtest.Kernel612, Timeout: 20 * time.Minute, MemoryMiB: 3072, Prepare: csidriver.Build}, []vmtest.Case{
		{Name: "KillUnderWriter", Run: overUblk(testKillUnderWriter)},
		{Name: "SnapshotWhileWriting", Run: overUblk(func(t *testing.T) { testSnapshotWhileWriting(t, false) })},
	})
}

const mib = int64(1) << 20

// env is one storage root on its own scratch filesystem, a kubelet
// directory outside it (staging and target paths) and the driver serving
// them.
type env struct {
	t    *testing.T
	ctx  context.Context
	mnt  string // the scratch filesystem; the root is a directory in it
	root string
	work string
	cfg  csidriver.Config
	d    *csidriver.Driver
	// staged are the volumes to unstage (and their targets to unpublish)
	// if the case ends early, so that the scratch filesystem unmounts.
	staged map[string]*vol
}

// newEnv makes a storage root of rootMiB on an ext4 scratch filesystem
// and starts the driver on it with args added to its flags.
func newEnv(t *testing.T, rootMiB int, args ...string) *env {
	t.Helper()
	e := &env{t: t, ctx: testCtx(t, 20*time.Minute), staged: map[string]*vol{}}
	e.mnt = vmtest.ScratchFS(t, "ext4", rootMiB)
	e.root = filepath.Join(e.mnt, "root")
	if err := os.Mkdir(e.root, 0o700); err != nil {
		t.Fatal(err)
	}
	e.work = t.TempDir()
	if a := os.Getenv(attachEnv); a != "" {
		args = append(args, "--attach", a)
	}
	e.cfg = csidriver.Config{Root: e.root, Socket: filepath.Join(e.work, "csi.sock"),
		Args: append([]string{"--kubelet-dir", e.work}, args...)}
	e.d = csidriver.Start(t, e.ctx, e.cfg)
	// Registered after the driver's own cleanup, so it runs first, while
	// the driver still serves.
	t.Cleanup(e.cleanup)
	return e
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// cleanup unpublishes and unstages what a failed case left staged.
func (e *env) cleanup() {
	if len(e.staged) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, v := range e.staged {
		if v.published {
			if _, err := e.d.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
				e.t.Logf("cleanup: unpublish %s: %v", v.id, err)
			}
		}
		if _, err := e.d.Node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			e.t.Logf("cleanup: unstage %s: %v", v.id, err)
		}
	}
}

// restart kills the driver (SIGKILL) or stops it (SIGTERM) and starts a
// successor on the same socket, root and node id; it returns when the
// successor answers Probe, which is after its restart recovery.
func (e *env) restart(kill bool) {
	e.t.Helper()
	if kill {
		e.d.Kill(e.t)
	} else {
		e.d.Stop(e.t)
	}
	e.d.CheckLog(e.t)
	e.d = csidriver.Start(e.t, e.ctx, e.cfg)
}

// finish stops the driver cleanly and checks its log.
func (e *env) finish() {
	e.t.Helper()
	e.d.Stop(e.t)
	e.d.CheckLog(e.t)
}

// vol is a volume as the CO sees it: its id and context, the capability
// it is used with and where it is staged and published.
type vol struct {
	id, name        string
	size            int64
	cap             *csi.VolumeCapability
	vctx            map[string]string
	staging, target string
	published       bool
}

func (v *vol) block() bool { return v.cap.GetBlock() != nil }

func accessMode() *csi.VolumeCapability_AccessMode {
	return &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}
}

// mountCap is filesystem access with fsType ("" for the default).
func mountCap(fsType string) *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: accessMode()}
}

func blockCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}, AccessMode: accessMode()}
}

// createReq is a CreateVolume request for a ploop volume of size bytes.
func createReq(name string, size int64, c *csi.VolumeCapability, src *csi.VolumeContentSource) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{Name: name, Parameters: map[string]string{"type": "ploop"},
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{c},
		VolumeContentSource: src}
}

// create makes a ploop volume of size bytes used with capability c,
// from src when it is not nil.
func (e *env) create(name string, size int64, c *csi.VolumeCapability, src *csi.VolumeContentSource) *vol {
	e.t.Helper()
	r, err := e.d.Controller.CreateVolume(e.ctx, createReq(name, size, c, src))
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	if got := r.GetVolume().GetCapacityBytes(); got != size {
		e.t.Fatalf("CreateVolume %s: %d bytes, want %d", name, got, size)
	}
	return e.withCap(&vol{id: r.GetVolume().GetVolumeId(), name: name, size: size, vctx: r.GetVolume().GetVolumeContext()}, c)
}

// withCap is v used with capability c, staged and published at paths of
// its own (a Block target is a file).
func (e *env) withCap(v *vol, c *csi.VolumeCapability) *vol {
	e.t.Helper()
	nv := *v
	nv.cap, nv.published = c, false
	kind := "mount"
	if nv.block() {
		kind = "block"
	}
	nv.staging = filepath.Join(e.work, "staging", nv.name+"-"+kind)
	pod := filepath.Join(e.work, "pods", nv.name+"-"+kind)
	if err := os.MkdirAll(pod, 0o750); err != nil {
		e.t.Fatal(err)
	}
	if err := os.MkdirAll(nv.staging, 0o750); err != nil {
		e.t.Fatal(err)
	}
	nv.target = filepath.Join(pod, "volume")
	return &nv
}

// up stages and publishes v.
func (e *env) up(v *vol) {
	e.t.Helper()
	if _, err := e.d.Node.NodeStageVolume(e.ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
		VolumeCapability: v.cap, VolumeContext: v.vctx}); err != nil {
		e.t.Fatalf("NodeStageVolume %s (%s): %v", v.name, v.id, err)
	}
	e.staged[v.id] = v
	if _, err := e.d.Node.NodePublishVolume(e.ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
		TargetPath: v.target, VolumeCapability: v.cap, VolumeContext: v.vctx}); err != nil {
		e.t.Fatalf("NodePublishVolume %s (%s): %v", v.name, v.id, err)
	}
	v.published = true
}

// down unpublishes and unstages v.
func (e *env) down(v *vol) {
	e.t.Helper()
	if _, err := e.d.Node.NodeUnpublishVolume(e.ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		e.t.Fatalf("NodeUnpublishVolume %s: %v", v.name, err)
	}
	v.published = false
	if _, err := e.d.Node.NodeUnstageVolume(e.ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		e.t.Fatalf("NodeUnstageVolume %s: %v", v.name, err)
	}
	delete(e.staged, v.id)
}

func (e *env) deleteVolume(v *vol) {
	e.t.Helper()
	if _, err := e.d.Controller.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
		e.t.Fatalf("DeleteVolume %s: %v", v.name, err)
	}
}

// stats is NodeGetVolumeStats of v at its target, with its condition.
func (e *env) stats(v *vol) (*csi.NodeGetVolumeStatsResponse, csidriver.VolumeCondition) {
	e.t.Helper()
	st, err := e.d.Node.NodeGetVolumeStats(e.ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target, StagingTargetPath: v.staging})
	if err != nil {
		e.t.Fatalf("NodeGetVolumeStats %s: %v", v.name, err)
	}
	c, ok, err := csidriver.Condition(st)
	if err != nil || !ok {
		e.t.Fatalf("NodeGetVolumeStats %s: no VolumeCondition (%v)", v.name, err)
	}
	return st, c
}

// stackDir is where the catalogue keeps a ploop volume's stack.
func (e *env) stackDir(v *vol) string { return filepath.Join(e.root, "ploop", "volumes", v.id) }

// fsckBlock stages v as a Block volume (no fsck, no mount), runs
// e2fsck -fn on the published device node, and unstages it: the
// filesystem as it is on the image, checked without repairing.
func (e *env) fsckBlock(v *vol) string {
	e.t.Helper()
	out, code := e.fsckStatus(v)
	if code != 0 {
		e.t.Fatalf("e2fsck -fn of %s: exit status %d\n%s", v.name, code, out)
	}
	return out
}

// fsckStatus is fsckBlock that returns e2fsck's output and exit status.
func (e *env) fsckStatus(v *vol) (string, int) {
	e.t.Helper()
	b := e.withCap(v, blockCap())
	e.up(b)
	out, code := testcmd.Status(e.t, "e2fsck", "-fn", b.target)
	e.down(b)
	return out, code
}

// wantClean checks a stack whose volume is not attached: no in-use mark,
// no damage.
func wantClean(t *testing.T, dir string) {
	t.Helper()
	rep, err := ploop.CheckStack(dir)
	if err != nil || !rep.Clean() {
		t.Fatalf("stack %s: %v\n%s", dir, err, rep)
	}
}

// allocated is what the files under dir occupy on their filesystem.
func allocated(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return err
		}
		n += st.Blocks * 512
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func dropCaches(t *testing.T) {
	t.Helper()
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		t.Fatal(err)
	}
}

// wantCode checks that err has gRPC code want (codes.OK: no error).
func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Errorf("%s: %v (%v), want %v", what, got, err, want)
	}
}

// statfs returns the size and free bytes of the filesystem at p.
func statfs(t *testing.T, p string) (size, avail int64) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize
}

// isIOErr reports whether err says a filesystem is out of space, turned
// read-only, or its device failed.
func isIOErr(err error) bool {
	return errors.Is(err, unix.EIO) || errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EROFS)
}
