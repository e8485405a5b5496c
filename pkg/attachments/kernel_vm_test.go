package attachments

// Kernel-facing tests: one VM boot (test/e2e/vmtest) runs every case with
// the real nbd driver, mkfs, mount, resize and quota tools. Storage roots
// are ext4 scratch filesystems (vmtest.ScratchFS) in the guest's memory.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/pkg/mounts"
	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
)

func TestKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{Timeout: 20 * time.Minute, MemoryMiB: 3072}, []vmtest.Case{
		{Name: "Ext4Lifecycle", Run: testExt4Lifecycle},
		{Name: "XFSSnapshotClone", Run: testXFSSnapshotClone},
		{Name: "Block", Run: testBlock},
		{Name: "Simfs", Run: testSimfs},
		{Name: "ExpandOnline", Run: testExpandOnline},
		{Name: "Trim", Run: testTrim},
		{Name: "KillUnderWriter", Run: testKillUnderWriter},
		{Name: "RebootRestage", Run: testRebootRestage},
		{Name: "ImageGone", Run: testImageGone},
		{Name: "DeadLink", Run: testDeadLink},
		{Name: "Parallel", Run: testParallel},
		{Name: "SharedServer", Run: testSharedServer},
		{Name: "TwoNodesOneRoot", Run: testTwoNodesOneRoot},
	})
}

// transportEnv carries the transport the VM cases attach through (""
// for nbd) from a TestKernel* to its cases, and on to their children.
const transportEnv = "PLOOP_CSI_TEST_TRANSPORT"

// TestKernelUblk runs the data-path cases again over ublk, on the 6.12
// kernel (the default one has no ublk_drv): the same stage, snapshot,
// clone, kill and parallel checks, the node's default transport ublk.
func TestKernelUblk(t *testing.T) {
	overUblk := func(run func(*testing.T)) func(*testing.T) {
		return func(t *testing.T) {
			t.Setenv(transportEnv, string(TransportUblk))
			run(t)
		}
	}
	vmtest.Run(t, vmtest.Options{Kernel: vmtest.Kernel612, Timeout: 20 * time.Minute, MemoryMiB: 3072}, []vmtest.Case{
		{Name: "Ext4Lifecycle", Run: overUblk(testExt4Lifecycle)},
		{Name: "XFSSnapshotClone", Run: overUblk(testXFSSnapshotClone)},
		{Name: "Block", Run: overUblk(testBlock)},
		{Name: "ExpandOnline", Run: overUblk(testExpandOnline)},
		{Name: "KillUnderWriter", Run: overUblk(testKillUnderWriter)},
		{Name: "Parallel", Run: overUblk(testParallel)},
		{Name: "PerVolumeTransport", Run: testPerVolumeTransport},
		{Name: "StoppedElsewhere", Run: overUblk(testUblkStoppedElsewhere)},
	})
}

// vmEnv is a storage root on its own filesystem and a kubelet directory
// outside it.
type vmEnv struct {
	root, kubelet, stateDir string
	deadConn                time.Duration
	transport               Transport // the node's default
}

func newVMEnv(t *testing.T, rootMiB int) *vmEnv {
	t.Helper()
	e := &vmEnv{root: vmtest.ScratchFS(t, "ext4", rootMiB), kubelet: t.TempDir(), deadConn: 60 * time.Second,
		transport: Transport(os.Getenv(transportEnv))}
	e.stateDir = filepath.Join(e.root, "nodes", "vm")
	return e
}

func (e *vmEnv) options(t *testing.T) Options {
	return Options{
		StorageRoot: e.root, NodeID: "vm", PathPrefixes: []string{e.kubelet},
		Attach: AttachOptions{Connections: 2, DeadConnTimeout: e.deadConn, Transport: e.transport},
		Logger: ktesting.NewLogger(t, ktesting.NewConfig(ktesting.Verbosity(2))),
	}
}

func (e *vmEnv) child(stage *StageRequest) childConfig {
	return childConfig{StorageRoot: e.root, StateDir: e.stateDir, PathPrefixes: []string{e.kubelet}, DeadConnTimeout: e.deadConn, Transport: e.transport, Stage: stage}
}

// ublk says whether the volumes attach through ublk.
func (e *vmEnv) ublk() bool { return e.transport == TransportUblk }

// wantDevice checks that dev is the kernel device of volume id over the
// env's transport (a block device, found the way recovery finds it).
func (e *vmEnv) wantDevice(t *testing.T, m *Manager, id, dev string) {
	t.Helper()
	if st, err := os.Stat(dev); err != nil || st.Mode()&os.ModeDevice == 0 {
		t.Fatalf("%s is not a block device: %v", dev, err)
	}
	if e.ublk() {
		info, ok, err := serving.FindUblk(m.ublk, id)
		if err != nil || !ok || ublkDevicePath(info.ID) != dev || info.Flags&ublk.RecoveryFeatures != ublk.RecoveryFeatures {
			t.Fatalf("ublk device of %s: %+v, %v, %v; want %s, recoverable", id, info, ok, err, dev)
		}
		return
	}
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/backend"); err != nil || strings.TrimSpace(string(b)) != id {
		t.Fatalf("backend of %s: %q, %v", dev, b, err)
	}
}

// wantNoDevice checks that no kernel device carries volume id.
func (e *vmEnv) wantNoDevice(t *testing.T, id string) {
	t.Helper()
	if _, err := nbd.FindBackend(id); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("an nbd device still carries %s: %v", id, err)
	}
	if !e.ublk() {
		return
	}
	ctrl, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	if info, ok, err := serving.FindUblk(ctrl, id); ok || err != nil {
		t.Fatalf("a ublk device still carries %s: /dev/ublkb%d, %v", id, info.ID, err)
	}
}

// manager starts a Manager; at the end of the test every volume it still
// has is unstaged (so that the scratch root unmounts) and it is closed.
func (e *vmEnv) manager(t *testing.T, mod func(o *Options)) *Manager {
	t.Helper()
	o := e.options(t)
	if mod != nil {
		mod(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	m, err := New(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cleanupManager(t, m) })
	return m
}

func cleanupManager(t *testing.T, m *Manager) {
	if m.checkOpen() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	m.mu.Lock()
	var vols []*volume
	for _, v := range m.vols {
		vols = append(vols, v)
	}
	m.mu.Unlock()
	for _, v := range vols {
		for _, tg := range v.rec.Targets {
			m.Unpublish(ctx, v.rec.VolumeID, tg.Path)
		}
		if err := m.Unstage(ctx, v.rec.VolumeID, v.rec.StagingPath); err != nil {
			t.Errorf("cleanup: unstage %s: %v", v.rec.VolumeID, err)
		}
	}
	m.Close()
}

// stack makes a ploop volume's stack directory in the root.
func (e *vmEnv) stack(t *testing.T, id string, size int64) string {
	t.Helper()
	dir := filepath.Join(e.root, "ploop", id)
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := ploop.InitStack(dir, ploop.InitOptions{Size: size, ClusterSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func (e *vmEnv) ploopReq(t *testing.T, id string, size int64, fstype string) StageRequest {
	return StageRequest{VolumeID: id, Kind: Ploop, Path: e.stack(t, id, size), StagingPath: filepath.Join(e.kubelet, "staging", id), FSType: fstype}
}

func (e *vmEnv) target(name string) string { return filepath.Join(e.kubelet, "pods", name) }

func tctx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func pattern(seed, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func mustStats(t *testing.T, m *Manager, id, path string) VolumeStats {
	t.Helper()
	st, err := m.Stats(tctx(t, time.Minute), id, path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func wantHealthy(t *testing.T, st VolumeStats) {
	t.Helper()
	if st.Condition.Abnormal {
		t.Fatalf("volume abnormal: %s", st.Condition.Message)
	}
}

// wantAbnormal fails t unless the condition is abnormal and its message
// mentions one of substrs (some failures are seen by whichever check gets
// there first).
func wantAbnormal(t *testing.T, st VolumeStats, substrs ...string) {
	t.Helper()
	if st.Condition.Abnormal && slices.ContainsFunc(substrs, func(s string) bool { return strings.Contains(st.Condition.Message, s) }) {
		t.Logf("abnormal as expected: %s", st.Condition.Message)
		return
	}
	t.Fatalf("condition %+v, want abnormal mentioning one of %q", st.Condition, substrs)
}

func wantClean(t *testing.T, dir string) {
	t.Helper()
	rep, err := ploop.CheckStack(dir)
	if err != nil || !rep.Clean() {
		t.Fatalf("stack %s after unstage: %v\n%s", dir, err, rep)
	}
}

// allocated is what the stack's files occupy in the storage root.
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
	testcmd.Combined(t, "sync")
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		t.Fatal(err)
	}
}

// testExt4Lifecycle: stage (with mkfs and mount options), idempotent and
// conflicting repeats, two publishes (one read-only), a planned restart,
// ErrInUse while published, stats and conditions (ext4 errors, a nearly
// full root), unpublish and unstage with their repeats, a clean stack, and
// the data still there at the next stage.
func testExt4Lifecycle(t *testing.T) {
	e := newVMEnv(t, 1024)
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	req := e.ploopReq(t, "ploop-ext4", 256<<20, "")
	req.MkfsOptions = []string{"-L", "lifecycle"}
	req.MountOptions = []string{"noatime"}
	for i := range 2 {
		if err := m.Stage(ctx, req); err != nil {
			t.Fatalf("stage #%d: %v", i+1, err)
		}
	}
	if n, want := m.MaxVolumes(), map[bool]int{false: 16, true: 64}[e.ublk()]; n != want {
		t.Fatalf("MaxVolumes = %d, want the guest's %d devices", n, want)
	}
	dev := m.get(req.VolumeID).served.Device()
	e.wantDevice(t, m, req.VolumeID, dev)
	if got := strings.TrimSpace(testcmd.Combined(t, "blkid", "-s", "LABEL", "-o", "value", dev)); got != "lifecycle" {
		t.Fatalf("label %q: mkfs options not applied", got)
	}
	if mi, ok, _ := mounts.Mounted(req.StagingPath); !ok || mi.FSType != "ext4" || !strings.Contains(strings.Join(mi.Options, ","), "noatime") {
		t.Fatalf("staging mount %+v", mi)
	}
	for name, mod := range map[string]func(r *StageRequest){
		"staging path": func(r *StageRequest) { r.StagingPath += "-other" },
		"filesystem":   func(r *StageRequest) { r.FSType = FSXFS },
		"block":        func(r *StageRequest) { r.Block, r.FSType, r.MkfsOptions, r.MountOptions = true, "", nil, nil },
	} {
		r := req
		mod(&r)
		if err := m.Stage(ctx, r); !errors.Is(err, ErrConflict) {
			t.Fatalf("stage with another %s: %v, want ErrConflict", name, err)
		}
	}

	rw, ro := e.target("rw"), e.target("ro")
	os.MkdirAll(filepath.Dir(rw), 0o750)
	pub := PublishRequest{VolumeID: req.VolumeID, StagingPath: req.StagingPath, TargetPath: rw}
	for i := range 2 {
		if err := m.Publish(ctx, pub); err != nil {
			t.Fatalf("publish #%d: %v", i+1, err)
		}
	}
	pubRO := pub
	pubRO.TargetPath, pubRO.ReadOnly = ro, true
	if err := m.Publish(ctx, pubRO); err != nil {
		t.Fatal(err)
	}
	clash := pub
	clash.ReadOnly = true
	if err := m.Publish(ctx, clash); !errors.Is(err, ErrConflict) {
		t.Fatalf("publish of a target with another read-only mode: %v", err)
	}
	if err := m.Publish(ctx, PublishRequest{VolumeID: req.VolumeID, StagingPath: req.StagingPath + "-x", TargetPath: e.target("x")}); !errors.Is(err, ErrNotStaged) {
		t.Fatalf("publish from the wrong staging path: %v", err)
	}
	data := pattern(1, 3<<20)
	if err := os.WriteFile(filepath.Join(rw, "data"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(ro, "data")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the read-only target: %d bytes, %v", len(got), err)
	}
	if err := os.WriteFile(filepath.Join(ro, "nope"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write through the read-only target: %v", err)
	}

	// A planned restart: the next Manager takes the device over.
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	obs := &recordingObserver{}
	m = e.manager(t, func(o *Options) { o.Observer = obs })
	if got := m.get(req.VolumeID); got == nil || got.served == nil || got.served.Device() != dev {
		t.Fatalf("after restart: %+v", got)
	}
	obs.mu.Lock()
	if err, ok := obs.reattached[req.VolumeID]; !ok || err != nil || len(obs.reattached) != 1 {
		t.Errorf("re-attaches observed: %v, want %s without error", obs.reattached, req.VolumeID)
	}
	obs.mu.Unlock()
	if err := os.WriteFile(filepath.Join(rw, "after-restart"), data, 0o644); err != nil {
		t.Fatalf("write after restart: %v", err)
	}

	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); !errors.Is(err, ErrInUse) {
		t.Fatalf("unstage while published: %v, want ErrInUse", err)
	}
	st := mustStats(t, m, req.VolumeID, rw)
	wantHealthy(t, st)
	if st.TotalBytes < 200<<20 || st.TotalBytes > 256<<20 || st.UsedBytes < 6<<20 || st.AvailableBytes > st.TotalBytes-st.UsedBytes || st.TotalInodes == 0 || st.UsedInodes < 13 {
		t.Fatalf("stats %+v", st)
	}
	if _, err := m.Stats(ctx, req.VolumeID, e.target("elsewhere")); !errors.Is(err, ErrNotStaged) {
		t.Fatalf("stats at a path the volume is not at: %v", err)
	}

	// The root nearly full: a file takes all but 4 MiB of it.
	var sfs unix.Statfs_t
	unix.Statfs(e.root, &sfs)
	filler := filepath.Join(e.root, "filler")
	testcmd.Combined(t, "fallocate", "-l", fmt.Sprint(int64(sfs.Bavail)*sfs.Bsize-4<<20), filler)
	wantAbnormal(t, mustStats(t, m, req.VolumeID, rw), "nearly full")
	os.Remove(filler)
	wantHealthy(t, mustStats(t, m, req.VolumeID, rw))

	// The filesystem logs an error (the kernel's test hook).
	if err := os.WriteFile("/sys/fs/ext4/"+filepath.Base(dev)+"/trigger_fs_error", []byte("test\n"), 0); err != nil {
		t.Fatal(err)
	}
	wantAbnormal(t, mustStats(t, m, req.VolumeID, req.StagingPath), "logged")

	for _, p := range []string{rw, ro, rw} {
		if err := m.Unpublish(ctx, req.VolumeID, p); err != nil {
			t.Fatalf("unpublish %s: %v", p, err)
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("target %s left: %v", p, err)
		}
	}
	for i := range 2 {
		if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
			t.Fatalf("unstage #%d: %v", i+1, err)
		}
	}
	e.wantNoDevice(t, req.VolumeID)
	if _, err := os.Stat(dev); !errors.Is(err, os.ErrNotExist) && e.ublk() {
		t.Fatalf("%s left after unstage: %v", dev, err)
	}
	if _, err := os.Stat(req.StagingPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("staging path left: %v", err)
	}
	wantClean(t, req.Path)

	// Staged again: not reformatted, fsck -a has cleared the error.
	if err := m.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(req.StagingPath, "after-restart")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data after restaging: %d bytes, %v", len(got), err)
	}
	wantHealthy(t, mustStats(t, m, req.VolumeID, req.StagingPath))
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	wantClean(t, req.Path)
}

// testXFSSnapshotClone: an online snapshot of a staged xfs volume (frozen
// for the switch) is cloned with ploop.Clone; the clone, which carries the
// source's filesystem UUID, stages next to the source and holds exactly
// the snapshot's files. Then the snapshot is deleted and the source
// compacted online, and online operations on a volume this node does not
// serve say ErrNotAttached.
func testXFSSnapshotClone(t *testing.T) {
	e := newVMEnv(t, 1024)
	obs := &recordingObserver{}
	m := e.manager(t, func(o *Options) { o.Observer = obs })
	ctx := tctx(t, 5*time.Minute)
	src := e.ploopReq(t, "ploop-xfs", 320<<20, FSXFS)
	if err := m.Stage(ctx, src); err != nil {
		t.Fatal(err)
	}
	before := pattern(2, 1<<20)
	if err := os.WriteFile(filepath.Join(src.StagingPath, "before"), before, 0o644); err != nil {
		t.Fatal(err)
	}
	guid, err := m.Snapshot(ctx, src.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src.StagingPath, "after"), before, 0o644); err != nil {
		t.Fatalf("write after the snapshot (thawed?): %v", err)
	}
	cloneDir := filepath.Join(e.root, "ploop", "ploop-xfs-clone")
	if err := ploop.Clone(src.Path, guid, cloneDir); err != nil {
		t.Fatal(err)
	}
	clone := StageRequest{VolumeID: "ploop-xfs-clone", Kind: Ploop, Path: cloneDir, StagingPath: filepath.Join(e.kubelet, "staging", "clone"), FSType: FSXFS}
	if err := m.Stage(ctx, clone); err != nil {
		t.Fatalf("stage an xfs clone next to its source: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(clone.StagingPath, "before")); err != nil || !bytes.Equal(got, before) {
		t.Fatalf("clone's file: %d bytes, %v", len(got), err)
	}
	if _, err := os.Stat(filepath.Join(clone.StagingPath, "after")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("clone holds a file written after the snapshot: %v", err)
	}
	if err := os.WriteFile(filepath.Join(clone.StagingPath, "own"), before, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := m.DeleteSnapshot(ctx, src.VolumeID, guid); err != nil {
		t.Fatal(err)
	}
	if err := m.Compact(ctx, src.VolumeID); err != nil {
		t.Fatal(err)
	}
	if ok, err := m.Attached(ctx, src.VolumeID); err != nil || !ok {
		t.Fatalf("Attached = %t, %v", ok, err)
	}
	// Each online operation told the Observer how long it paused I/O.
	if got := obs.pausedOps(); !slices.Equal(got, []string{"snapshot", "snapshot-delete", "compact"}) {
		t.Errorf("pauses observed for %v, want snapshot, snapshot-delete, compact", got)
	}
	for _, r := range []StageRequest{src, clone} {
		if err := m.Unstage(ctx, r.VolumeID, r.StagingPath); err != nil {
			t.Fatal(err)
		}
		wantClean(t, r.Path)
	}
	if ok, err := m.Attached(ctx, src.VolumeID); err != nil || ok {
		t.Fatalf("Attached after unstage = %t, %v", ok, err)
	}
	for name, err := range map[string]error{
		"snapshot": func() error { _, err := m.Snapshot(ctx, src.VolumeID); return err }(),
		"delete":   m.DeleteSnapshot(ctx, src.VolumeID, guid),
		"grow":     m.Grow(ctx, src.VolumeID, 1<<30),
		"compact":  m.Compact(ctx, src.VolumeID),
	} {
		if !errors.Is(err, ErrNotAttached) {
			t.Errorf("%s of a volume not attached: %v, want ErrNotAttached", name, err)
		}
	}
}

// testBlock: a Block volume is attached without a filesystem and its device
// node bound onto target files; data written through one target reads
// back through another; it grows online; stats report its size.
func testBlock(t *testing.T) {
	e := newVMEnv(t, 512)
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	req := StageRequest{VolumeID: "ploop-block", Kind: Ploop, Path: e.stack(t, "ploop-block", 64<<20), StagingPath: filepath.Join(e.kubelet, "staging", "block"), Block: true}
	for i := range 2 {
		if err := m.Stage(ctx, req); err != nil {
			t.Fatalf("stage #%d: %v", i+1, err)
		}
	}
	os.MkdirAll(e.target(""), 0o750)
	t1, t2 := e.target("dev1"), e.target("dev2")
	for _, p := range []string{t1, t1, t2} {
		if err := m.Publish(ctx, PublishRequest{VolumeID: req.VolumeID, StagingPath: req.StagingPath, TargetPath: p, Block: true}); err != nil {
			t.Fatalf("publish %s: %v", p, err)
		}
	}
	if err := m.Publish(ctx, PublishRequest{VolumeID: req.VolumeID, StagingPath: req.StagingPath, TargetPath: e.target("dir")}); !errors.Is(err, ErrConflict) {
		t.Fatalf("filesystem publish of a block volume: %v", err)
	}
	data := pattern(3, 1<<20)
	f, err := os.OpenFile(t1, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 5<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dropCaches(t)
	got := make([]byte, len(data))
	g, err := os.Open(t2)
	if err != nil {
		t.Fatal(err)
	}
	_, err = g.ReadAt(got, 5<<20)
	g.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the second target: %v", err)
	}
	st := mustStats(t, m, req.VolumeID, t1)
	wantHealthy(t, st)
	if !st.Block || st.TotalBytes != 64<<20 {
		t.Fatalf("block stats %+v", st)
	}
	// Online expansion while the device is published and open.
	h, err := os.Open(t2)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	grown := int64(96 << 20)
	for i := range 2 {
		size, err := m.Expand(ctx, req.VolumeID, 96<<20, t1)
		if e.ublk() {
			// Refused, changing nothing (testExpandOnline grows it offline).
			if !errors.Is(err, ErrInUse) {
				t.Fatalf("expand #%d of a ublk device: %v, want ErrInUse", i+1, err)
			}
			grown = 64 << 20
			continue
		}
		if err != nil || size != 96<<20 {
			t.Fatalf("expand #%d: %d, %v", i+1, size, err)
		}
	}
	if n, err := unix.Seek(int(h.Fd()), 0, 2); err != nil || n != grown {
		t.Fatalf("open device has %d bytes after expansion, want %d: %v", n, grown, err)
	}
	h.Close()
	for _, p := range []string{t1, t2} {
		if err := m.Unpublish(ctx, req.VolumeID, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	wantClean(t, req.Path)
}

// testSimfs: a simfs volume stages after checking its quota, publishes
// read-write and read-only, reports usage from the quota, and unstages.
func testSimfs(t *testing.T) {
	e := newVMEnv(t, 512)
	if err := os.Mkdir(filepath.Join(e.root, "simfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	root, err := simfs.Open(filepath.Join(e.root, "simfs"), simfs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	vol, err := root.Create("simfs-vol", 8<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	m := e.manager(t, func(o *Options) { o.Dirs = root })
	ctx := tctx(t, 5*time.Minute)
	req := StageRequest{VolumeID: vol.ID, Kind: Simfs, Path: vol.Path, StagingPath: filepath.Join(e.kubelet, "staging", "simfs")}
	for i := range 2 {
		if err := m.Stage(ctx, req); err != nil {
			t.Fatalf("stage #%d: %v", i+1, err)
		}
	}
	os.MkdirAll(e.target(""), 0o750)
	rw, ro := e.target("rw"), e.target("ro")
	if err := m.Publish(ctx, PublishRequest{VolumeID: vol.ID, StagingPath: req.StagingPath, TargetPath: rw}); err != nil {
		t.Fatal(err)
	}
	if err := m.Publish(ctx, PublishRequest{VolumeID: vol.ID, StagingPath: req.StagingPath, TargetPath: ro, ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rw, "f"), pattern(4, 2<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "sync")
	if _, err := os.Stat(filepath.Join(vol.Path, "f")); err != nil {
		t.Fatalf("file written through the target is not in the volume: %v", err)
	}
	if err := os.WriteFile(filepath.Join(ro, "g"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write through the read-only target: %v", err)
	}
	st := mustStats(t, m, vol.ID, rw)
	wantHealthy(t, st)
	if st.TotalBytes != 8<<20 || st.UsedBytes < 2<<20 || st.TotalInodes != 100 || st.UsedInodes < 2 {
		t.Fatalf("stats from the quota: %+v", st)
	}
	if size, err := m.Expand(ctx, vol.ID, 16<<20, rw); err != nil || size != 8<<20 {
		t.Fatalf("node expansion of simfs (nothing to do): %d, %v", size, err)
	}
	if err := m.Unstage(ctx, vol.ID, req.StagingPath); !errors.Is(err, ErrInUse) {
		t.Fatalf("unstage while published: %v", err)
	}

	// A single writer is the volume's only target: refused while others
	// stand, and refusing others while it stands.
	single := e.target("single")
	pub := func(target string, singleWriter bool) error {
		return m.Publish(ctx, PublishRequest{VolumeID: vol.ID, StagingPath: req.StagingPath, TargetPath: target, SingleWriter: singleWriter})
	}
	if err := pub(single, true); !errors.Is(err, ErrOtherTarget) {
		t.Fatalf("single-writer publish while published at two targets: %v, want ErrOtherTarget", err)
	}
	for _, p := range []string{rw, ro} {
		if err := m.Unpublish(ctx, vol.ID, p); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 2 {
		if err := pub(single, true); err != nil {
			t.Fatalf("single-writer publish #%d: %v", i+1, err)
		}
	}
	if err := pub(single, false); !errors.Is(err, ErrConflict) {
		t.Fatalf("the single-writer target again as multi-writer: %v, want ErrConflict", err)
	}
	for _, other := range []bool{false, true} {
		if err := pub(rw, other); !errors.Is(err, ErrOtherTarget) {
			t.Fatalf("publish (singleWriter=%t) at a second target of a single-writer volume: %v, want ErrOtherTarget", other, err)
		}
	}
	if mounted, err := mounts.New(klog.Background()).IsMountPoint(rw); err != nil || mounted {
		t.Fatalf("a refused publish mounted %s: %t, %v", rw, mounted, err)
	}
	if err := m.Unpublish(ctx, vol.ID, single); err != nil {
		t.Fatal(err)
	}
	if err := m.Unstage(ctx, vol.ID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(vol.Path, "f")); err != nil {
		t.Fatalf("volume data after unstage: %v", err)
	}
}

// testSharedServer: the Manager serves every ploop volume as an export of
// its one nbd.Server; a failed export (a panic in its request path, stood
// in for by the Failed hook) makes that volume's condition abnormal with a
// message that says what to do, and no other volume's; unstaging a volume
// removes its export and leaves the others serving.
func testSharedServer(t *testing.T) {
	e := newVMEnv(t, 512)
	var failed atomic.Value // the id of the volume whose export has failed
	failed.Store("")
	m := e.manager(t, func(o *Options) {
		o.exportFailed = func(v *serving.Volume) error {
			if id := failed.Load().(string); id != "" && strings.HasSuffix(v.Path(), "/"+id) {
				return &nbd.PanicError{Export: id, Value: "injected"}
			}
			return v.Failed()
		}
	})
	ctx := tctx(t, 5*time.Minute)
	ids := []string{"ploop-shared-a", "ploop-shared-b"}
	var reqs []StageRequest
	for _, id := range ids {
		r := StageRequest{VolumeID: id, Kind: Ploop, Path: e.stack(t, id, 32<<20), StagingPath: filepath.Join(e.kubelet, "staging", id), Block: true}
		if err := m.Stage(ctx, r); err != nil {
			t.Fatal(err)
		}
		reqs = append(reqs, r)
	}
	if got := m.srv.Exports(); len(got) != 2 || !slices.Contains(got, ids[0]) || !slices.Contains(got, ids[1]) {
		t.Fatalf("exports of the node's server: %v, want both volumes", got)
	}
	for _, r := range reqs {
		dev := m.get(r.VolumeID).served.Device()
		testcmd.Combined(t, "dd", "if=/dev/urandom", "of="+dev, "bs=1M", "count=2", "oflag=direct", "status=none")
		wantHealthy(t, mustStats(t, m, r.VolumeID, r.StagingPath))
	}
	failed.Store(ids[0])
	wantAbnormal(t, mustStats(t, m, ids[0], reqs[0].StagingPath), "stopped serving the volume after an internal error")
	wantHealthy(t, mustStats(t, m, ids[1], reqs[1].StagingPath))
	failed.Store("")

	if err := m.Unstage(ctx, ids[0], reqs[0].StagingPath); err != nil {
		t.Fatal(err)
	}
	if got := m.srv.Exports(); len(got) != 1 || got[0] != ids[1] {
		t.Fatalf("exports after unstaging %s: %v", ids[0], got)
	}
	testcmd.Combined(t, "dd", "if="+m.get(ids[1]).served.Device(), "of=/dev/null", "bs=1M", "count=2", "iflag=direct", "status=none")
	if err := m.Unstage(ctx, ids[1], reqs[1].StagingPath); err != nil {
		t.Fatal(err)
	}
	if got := m.srv.Exports(); len(got) != 0 {
		t.Fatalf("exports after unstaging both: %v", got)
	}
}

// testTwoNodesOneRoot: two nodes' attachments over one storage root, as
// on a shared root (each with its own state directory): while one serves
// a volume, the other cannot stage it and is left with nothing of it (no
// device, no record, no mount); once the first has unstaged it, the
// second stages the same filesystem.
func testTwoNodesOneRoot(t *testing.T) {
	e := newVMEnv(t, 512)
	a := e.manager(t, nil)
	b := e.manager(t, func(o *Options) { o.NodeID = "vm-b" })
	ctx := tctx(t, 5*time.Minute)
	ra := e.ploopReq(t, "ploop-two-nodes", 64<<20, "ext4")
	if err := a.Stage(ctx, ra); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ra.StagingPath, "from-a"), []byte("a"), 0o600); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "sync")
	rb := ra
	rb.StagingPath = filepath.Join(e.kubelet, "staging-b", ra.VolumeID)
	err := b.Stage(ctx, rb)
	if err == nil {
		t.Fatal("a second node staged a volume the first serves")
	}
	t.Logf("the second node's stage: %v", err)
	if !errors.Is(err, ErrServedElsewhere) || strings.Contains(err.Error(), "ploopctl check --repair") {
		t.Errorf("the refusal does not say that another process serves the volume (or it suggests a repair): %v", err)
	}
	if b.get(ra.VolumeID) != nil {
		t.Error("the refused node keeps the volume")
	}
	if ents, err := os.ReadDir(filepath.Join(e.root, "nodes", "vm-b")); err == nil {
		for _, ent := range ents {
			if strings.Contains(ent.Name(), ra.VolumeID) {
				t.Errorf("the refused node keeps a record: %s", ent.Name())
			}
		}
	}
	if mounted, _ := b.mounter.IsMountPoint(rb.StagingPath); mounted {
		t.Error("the refused node mounted the volume")
	}
	wantHealthy(t, mustStats(t, a, ra.VolumeID, ra.StagingPath))

	if err := a.Unstage(ctx, ra.VolumeID, ra.StagingPath); err != nil {
		t.Fatal(err)
	}
	if err := b.Stage(ctx, rb); err != nil {
		t.Fatalf("stage on the second node after the first let go: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(rb.StagingPath, "from-a")); err != nil || string(got) != "a" {
		t.Errorf("the second node sees %q, %v; want the first node's file", got, err)
	}
	if err := b.Unstage(ctx, rb.VolumeID, rb.StagingPath); err != nil {
		t.Fatal(err)
	}
}

// testExpandOnline: ext4 and xfs grow while mounted and a file is open;
// the grow of an attached volume by the catalogue (Grow) followed by the
// node's expansion works, and repeats succeed.
func testExpandOnline(t *testing.T) {
	e := newVMEnv(t, 1024)
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	for _, tc := range []struct {
		fstype     string
		size, grow int64
	}{
		{FSExt4, 64 << 20, 128 << 20},
		{FSXFS, 320 << 20, 512 << 20},
	} {
		req := e.ploopReq(t, "ploop-grow-"+tc.fstype, tc.size, tc.fstype)
		if err := m.Stage(ctx, req); err != nil {
			t.Fatal(err)
		}
		f, err := os.Create(filepath.Join(req.StagingPath, "open"))
		if err != nil {
			t.Fatal(err)
		}
		before := mustStats(t, m, req.VolumeID, req.StagingPath)
		if e.ublk() {
			f.Close()
			expandUblk(t, e, m, req, tc.size, tc.grow, before)
			continue
		}
		for i := range 2 {
			size, err := m.Expand(ctx, req.VolumeID, tc.grow, req.StagingPath)
			if err != nil || size != tc.grow {
				t.Fatalf("%s expand #%d: %d, %v", tc.fstype, i+1, size, err)
			}
		}
		after := mustStats(t, m, req.VolumeID, req.StagingPath)
		t.Logf("%s: statfs total %d -> %d MiB", tc.fstype, before.TotalBytes>>20, after.TotalBytes>>20)
		if after.TotalBytes-before.TotalBytes < (tc.grow-tc.size)*9/10 {
			t.Fatalf("%s: the filesystem grew by %d bytes for %d", tc.fstype, after.TotalBytes-before.TotalBytes, tc.grow-tc.size)
		}
		// The catalogue grows the attached stack; the node step follows.
		if err := m.Grow(ctx, req.VolumeID, tc.grow+64<<20); err != nil {
			t.Fatal(err)
		}
		if size, err := m.Expand(ctx, req.VolumeID, tc.grow+64<<20, req.StagingPath); err != nil || size != tc.grow+64<<20 {
			t.Fatalf("%s expand after the controller's grow: %d, %v", tc.fstype, size, err)
		}
		if _, err := f.Write(pattern(5, 1<<20)); err != nil {
			t.Fatal(err)
		}
		f.Close()
		if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
			t.Fatal(err)
		}
		wantClean(t, req.Path)
	}
}

// expandUblk: a ublk device on 6.12 cannot change its size, so growing a
// staged volume is refused before the stack changes (FailedPrecondition
// for the CO, which retries), and the grow happens while it is unstaged
// (the catalogue's offline grow); staged again, the device has the new
// size and the node's expansion grows the filesystem.
func expandUblk(t *testing.T, e *vmEnv, m *Manager, req StageRequest, size, grow int64, before VolumeStats) {
	ctx := tctx(t, 5*time.Minute)
	if _, err := m.Expand(ctx, req.VolumeID, grow, req.StagingPath); !errors.Is(err, ErrInUse) || !strings.Contains(fmt.Sprint(err), "UPDATE_SIZE") {
		t.Fatalf("expand of a staged ublk volume: %v, want ErrInUse naming UPDATE_SIZE", err)
	}
	if err := m.Grow(ctx, req.VolumeID, grow); !errors.Is(err, ErrInUse) {
		t.Fatalf("grow of a staged ublk volume: %v, want ErrInUse", err)
	}
	if got := m.get(req.VolumeID).served.Size(); got != size {
		t.Fatalf("the refused grow changed the stack to %d bytes", got)
	}
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	st, err := ploop.OpenStack(req.Path, ploop.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Grow(grow); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	if got, err := m.Expand(ctx, req.VolumeID, grow, req.StagingPath); err != nil || got != grow {
		t.Fatalf("expand after the offline grow: %d, %v", got, err)
	}
	after := mustStats(t, m, req.VolumeID, req.StagingPath)
	if after.TotalBytes-before.TotalBytes < (grow-size)*9/10 {
		t.Fatalf("the filesystem grew by %d bytes for %d", after.TotalBytes-before.TotalBytes, grow-size)
	}
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	wantClean(t, req.Path)
	e.wantNoDevice(t, req.VolumeID)
}

// testPerVolumeTransport: on a node whose default is nbd, a volume asks
// for ublk and another for nbd; each gets its own kind of device, keeps
// it across a restart (when the node's default changed to ublk), and a
// repeated stage asking for the other transport is a conflict.
func testPerVolumeTransport(t *testing.T) {
	e := newVMEnv(t, 512)
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	if def, ok := m.Transport(); def != TransportNBD || !ok {
		t.Fatalf("default %q, ublk usable %v; want nbd, true", def, ok)
	}
	u := e.ploopReq(t, "ploop-u", 64<<20, "")
	u.Transport = TransportUblk
	n := e.ploopReq(t, "ploop-n", 64<<20, "")
	for _, r := range []StageRequest{u, n} {
		if err := m.Stage(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	devU, devN := m.get(u.VolumeID).served.Device(), m.get(n.VolumeID).served.Device()
	if !strings.HasPrefix(devU, "/dev/ublkb") || !strings.HasPrefix(devN, "/dev/nbd") {
		t.Fatalf("devices %s, %s; want ublk, nbd", devU, devN)
	}
	for _, r := range []StageRequest{u, n} {
		if err := os.WriteFile(filepath.Join(r.StagingPath, "f"), pattern(3, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	other := u
	other.Transport = TransportNBD
	if err := m.Stage(ctx, other); !errors.Is(err, ErrConflict) {
		t.Fatalf("stage over nbd of a volume staged over ublk: %v, want ErrConflict", err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m = e.manager(t, func(o *Options) { o.Attach.Transport = TransportUblk })
	if got := m.get(u.VolumeID).served.Device(); got != devU {
		t.Fatalf("ublk volume after restart on %q, want %s", got, devU)
	}
	if got := m.get(n.VolumeID).served.Device(); got != devN {
		t.Fatalf("nbd volume after restart on %q, want %s (a volume keeps its transport)", got, devN)
	}
	n.Transport = "" // the kubelet's repeat: the node's default is ublk now
	for _, r := range []StageRequest{u, n} {
		if err := m.Stage(ctx, r); err != nil {
			t.Fatalf("repeated stage of %s: %v", r.VolumeID, err)
		}
		if got, err := os.ReadFile(filepath.Join(r.StagingPath, "f")); err != nil || !bytes.Equal(got, pattern(3, 1<<20)) {
			t.Fatalf("%s after restart: %d bytes, %v", r.VolumeID, len(got), err)
		}
		if err := m.Unstage(ctx, r.VolumeID, r.StagingPath); err != nil {
			t.Fatal(err)
		}
		wantClean(t, r.Path)
	}
	(&vmEnv{transport: TransportUblk}).wantNoDevice(t, u.VolumeID)
	if _, err := os.Stat(devU); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s left after unstage: %v", devU, err)
	}
}

// testUblkStoppedElsewhere: someone else stops a volume's ublk device (an
// administrator's `ublk del` starts so): the volume's condition says so.
// The next node plugin finds a stopped device, nothing to take over: it
// deletes it and stages the Block volume again on a fresh device, with the
// data written before.
func testUblkStoppedElsewhere(t *testing.T) {
	e := newVMEnv(t, 512)
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	req := StageRequest{VolumeID: "ploop-stopped", Kind: Ploop, Path: e.stack(t, "ploop-stopped", 64<<20), StagingPath: filepath.Join(e.kubelet, "staging", "stopped"), Block: true}
	if err := m.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	data := pattern(7, 1<<20)
	rw := func(dev string, write bool) {
		t.Helper()
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if write {
			if _, err := f.WriteAt(data, 1<<20); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			return
		}
		got := make([]byte, len(data))
		if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read back through %s: %v", dev, err)
		}
	}
	rw(m.get(req.VolumeID).served.Device(), true)
	ctrl, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	old, ok, err := serving.FindUblk(ctrl, req.VolumeID)
	if err != nil || !ok {
		t.Fatalf("find the device: %v, %v", ok, err)
	}
	if err := ctrl.Stop(old.ID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.get(req.VolumeID).served.Gone():
	case <-ctx.Done():
		t.Fatal("the served volume did not notice its device was stopped")
	}
	wantAbnormal(t, mustStats(t, m, req.VolumeID, req.StagingPath), "disconnected by someone else")
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m = e.manager(t, nil)
	v := m.get(req.VolumeID)
	if v == nil || v.served == nil {
		t.Fatalf("not staged again after the restart: %+v", v)
	}
	rw(v.served.Device(), false)
	wantHealthy(t, mustStats(t, m, req.VolumeID, req.StagingPath))
	if now, ok, err := serving.FindUblk(ctrl, req.VolumeID); err != nil || !ok || now.State != ublk.StateLive {
		t.Fatalf("the volume's device after the restart: %+v, %v, %v", now, ok, err)
	}
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	e.wantNoDevice(t, req.VolumeID)
	wantClean(t, req.Path)
}

// testTrim: freed filesystem blocks return to the storage root — by an
// explicit trim, by the periodic trim, and at once with online discard.
func testTrim(t *testing.T) {
	mib := 512
	if testing.Short() {
		mib = 128
	}
	e := newVMEnv(t, 2048)
	passes := make(chan struct{}, 1)
	m := e.manager(t, func(o *Options) {
		o.TrimInterval = time.Second
		o.afterTrimPass = func() {
			select {
			case passes <- struct{}{}:
			default:
			}
		}
	})
	ctx := tctx(t, 10*time.Minute)
	req := e.ploopReq(t, "ploop-trim", 1<<30, "")
	online := e.ploopReq(t, "ploop-discard", 512<<20, "")
	online.OnlineDiscard = true
	for _, r := range []StageRequest{req, online} {
		if err := m.Stage(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	write := func(dir string, n int) {
		t.Helper()
		testcmd.Combined(t, "dd", "if=/dev/urandom", "of="+filepath.Join(dir, "big"), "bs=1M", fmt.Sprint("count=", n), "conv=fsync", "status=none")
	}
	// Explicit trim.
	base := allocated(t, req.Path)
	write(req.StagingPath, mib)
	full := allocated(t, req.Path)
	os.Remove(filepath.Join(req.StagingPath, "big"))
	testcmd.Combined(t, "sync")
	n, err := m.Trim(ctx, req.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	trimmed := allocated(t, req.Path)
	drop := float64(full-trimmed) / float64(full-base)
	t.Logf("trim: %d MiB written; image allocated %d -> %d -> %d MiB; filesystem trimmed %d MiB; %.1f%% of the written space came back",
		mib, base>>20, full>>20, trimmed>>20, n>>20, 100*drop)
	if drop < 0.95 {
		t.Fatalf("only %.1f%% of the written space came back", 100*drop)
	}

	// Periodic trim: wait for a pass that starts after the delete.
	write(req.StagingPath, 32)
	full = allocated(t, req.Path)
	os.Remove(filepath.Join(req.StagingPath, "big"))
	testcmd.Combined(t, "sync")
	for range 2 {
		select {
		case <-passes:
		case <-ctx.Done():
			t.Fatal("no periodic trim pass")
		}
	}
	if got := allocated(t, req.Path); full-got < 30<<20 {
		t.Fatalf("periodic trim: allocated %d -> %d MiB", full>>20, got>>20)
	}

	// Online discard: the space is back once the delete is committed.
	base = allocated(t, online.Path)
	write(online.StagingPath, 64)
	full = allocated(t, online.Path)
	os.Remove(filepath.Join(online.StagingPath, "big"))
	testcmd.Combined(t, "sync")
	start := time.Now()
	got := allocated(t, online.Path)
	t.Logf("online discard: allocated %d -> %d -> %d MiB right after sync", base>>20, full>>20, got>>20)
	for float64(full-got) < 0.95*float64(full-base) {
		select {
		case <-ctx.Done():
			t.Fatalf("online discard gave back %d of %d MiB", (full-got)>>20, (full-base)>>20)
		case <-time.After(100 * time.Millisecond):
		}
		got = allocated(t, online.Path)
	}
	t.Logf("online discard: %d MiB back %v after sync", (full-got)>>20, time.Since(start))
	for _, r := range []StageRequest{req, online} {
		if err := m.Unstage(ctx, r.VolumeID, r.StagingPath); err != nil {
			t.Fatal(err)
		}
	}
}

// writer writes numbered 256 KiB files, each fsynced, until stopped; every
// error is kept. progress receives the count after each file.
type writer struct {
	dir      string
	n        atomic.Int64
	slowest  atomic.Int64 // nanoseconds of the slowest file
	mu       sync.Mutex
	errs     []error
	stop     chan struct{}
	done     chan struct{}
	progress chan int64
}

const writerFile = 256 << 10

func startWriter(dir string) *writer {
	w := &writer{dir: dir, stop: make(chan struct{}), done: make(chan struct{}), progress: make(chan int64, 1)}
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			start := time.Now()
			err := writeSynced(filepath.Join(dir, fmt.Sprintf("f%05d", i)), pattern(i, writerFile))
			if d := int64(time.Since(start)); d > w.slowest.Load() {
				w.slowest.Store(d)
			}
			if err != nil {
				w.mu.Lock()
				w.errs = append(w.errs, err)
				w.mu.Unlock()
				if len(w.errs) > 10 {
					return
				}
				continue
			}
			n := w.n.Add(1)
			select {
			case w.progress <- n:
			default:
			}
		}
	}()
	return w
}

func writeSynced(path string, data []byte) error {
	f, err := os.Create(path)
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

// waitFor waits until the writer has written k more files than at.
func (w *writer) waitFor(t *testing.T, at int64, k int64) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for {
		if n := w.n.Load(); n >= at+k {
			return n
		}
		select {
		case <-w.progress:
		case <-w.done:
			t.Fatalf("writer stopped: %v", w.errors())
		case <-ctx.Done():
			t.Fatalf("writer made no progress (at %d): %v", w.n.Load(), w.errors())
		}
	}
}

func (w *writer) errors() []error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]error(nil), w.errs...)
}

func (w *writer) finish() int64 {
	close(w.stop)
	<-w.done
	return w.n.Load()
}

// testKillUnderWriter: the process that owns the Manager is SIGKILLed
// again and again while a writer fsyncs files on the staged ext4 volume;
// each successor recovers in New. The writer sees no error; after unstage
// the filesystem checks clean (e2fsck -fn), the stack is clean, and every
// file written reads back.
func testKillUnderWriter(t *testing.T) {
	kills := 4
	if testing.Short() {
		kills = 2
	}
	e := newVMEnv(t, 1024)
	req := e.ploopReq(t, "ploop-kill", 512<<20, "")
	child, dev := startChild(t, e.child(&req))
	w := startWriter(req.StagingPath)
	defer func() {
		select {
		case <-w.done:
		default:
			w.finish()
		}
	}()
	at := int64(0)
	for i := range kills {
		at = w.waitFor(t, at, 8)
		start := time.Now()
		kill(t, child)
		var dev2 string
		child, dev2 = startChild(t, e.child(nil))
		t.Logf("kill %d: writer at %d files; successor recovered %s in %v", i+1, at, dev2, time.Since(start))
		if dev2 != dev {
			t.Fatalf("successor serves %q, want %s", dev2, dev)
		}
	}
	at = w.waitFor(t, at, 8)
	kill(t, child)
	// The test process takes over last, and unstages.
	m := e.manager(t, nil)
	w.waitFor(t, at, 8)
	total := w.finish()
	if errs := w.errors(); len(errs) > 0 {
		t.Fatalf("the writer saw %d errors across %d kills: %v", len(errs), kills+1, errs)
	}
	t.Logf("writer: %d files of %d KiB fsynced across %d SIGKILLs, no errors; the slowest file took %v", total, writerFile>>10, kills+1, time.Duration(w.slowest.Load()))
	wantHealthy(t, mustStats(t, m, req.VolumeID, req.StagingPath))
	ctx := tctx(t, 5*time.Minute)
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	wantClean(t, req.Path)

	// fsck on the raw device, then every file.
	blk := StageRequest{VolumeID: req.VolumeID, Kind: Ploop, Path: req.Path, StagingPath: req.StagingPath, Block: true}
	if err := m.Stage(ctx, blk); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "e2fsck", "-fn", m.get(req.VolumeID).served.Device())
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	if err := m.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	dropCaches(t)
	for i := range int(total) {
		got, err := os.ReadFile(filepath.Join(req.StagingPath, fmt.Sprintf("f%05d", i)))
		if err != nil || !bytes.Equal(got, pattern(i, writerFile)) {
			t.Fatalf("file %d of %d after the kills: %d bytes, %v", i, total, len(got), err)
		}
	}
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	wantClean(t, req.Path)
}

// testRebootRestage: the node plugin dies and the device goes with it
// (what a reboot does); the next Manager finds the record, no device and
// nothing mounted, and stages the volume again, so its data is back at the
// staging path without a new Stage call.
func testRebootRestage(t *testing.T) {
	e := newVMEnv(t, 512)
	req := e.ploopReq(t, "ploop-reboot", 128<<20, "")
	child, dev := startChild(t, e.child(&req))
	data := pattern(6, 1<<20)
	if err := writeSynced(filepath.Join(req.StagingPath, "kept"), data); err != nil {
		t.Fatal(err)
	}
	kill(t, child)
	// The device goes, and the filesystem with it: the disconnect fails
	// the I/O the kernel holds, so the unmount can finish.
	k, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	index, _ := nbd.ParseDevice(dev)
	disconnected := make(chan error, 1)
	go func() { disconnected <- k.Disconnect(tctx(t, 2*time.Minute), index) }()
	if err := unix.Unmount(req.StagingPath, 0); err != nil {
		t.Fatal(err)
	}
	if err := <-disconnected; err != nil {
		t.Fatal(err)
	}
	m := e.manager(t, nil)
	v := m.get(req.VolumeID)
	if v == nil || v.served == nil || v.problem != "" {
		t.Fatalf("after the reboot: %+v", v)
	}
	if got, err := os.ReadFile(filepath.Join(req.StagingPath, "kept")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data after the restage: %d bytes, %v", len(got), err)
	}
	wantHealthy(t, mustStats(t, m, req.VolumeID, req.StagingPath))
	if err := m.Unstage(tctx(t, time.Minute), req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	wantClean(t, req.Path)
}

// testImageGone: after a restart one volume's stack is gone and another's
// descriptor is damaged. Both are reported abnormal, with what to do, and
// their devices are left alone; the third volume is recovered as usual;
// unstaging the lost ones disconnects their devices.
func testImageGone(t *testing.T) {
	e := newVMEnv(t, 512)
	e.deadConn = 5 * time.Second // the lost volume's unmount waits for it
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	lost := e.ploopReq(t, "ploop-lost", 64<<20, "")
	kept := e.ploopReq(t, "ploop-kept", 64<<20, "")
	broken := e.ploopReq(t, "ploop-broken", 64<<20, "")
	for _, r := range []StageRequest{lost, kept, broken} {
		if err := m.Stage(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	lostDev := m.get(lost.VolumeID).served.Device()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	moved := filepath.Join(e.root, "moved-away")
	if err := os.Rename(lost.Path, moved); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(broken.Path, ploop.DescriptorName), []byte("<Parallels_disk_image>garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	m = e.manager(t, nil)
	wantAbnormal(t, mustStats(t, m, lost.VolumeID, lost.StagingPath), "is gone")
	wantAbnormal(t, mustStats(t, m, broken.VolumeID, broken.StagingPath), "repair")
	if index, err := nbd.FindBackend(lost.VolumeID); err != nil || nbd.DevicePath(index) != lostDev {
		t.Fatalf("the lost volume's device was touched: %d, %v", index, err)
	}
	if _, err := nbd.FindBackend(broken.VolumeID); err != nil {
		t.Fatalf("the broken volume's device was touched: %v", err)
	}
	wantHealthy(t, mustStats(t, m, kept.VolumeID, kept.StagingPath))
	if err := writeSynced(filepath.Join(kept.StagingPath, "f"), pattern(7, 1<<20)); err != nil {
		t.Fatalf("the other volume after the restart: %v", err)
	}
	for _, r := range []StageRequest{lost, kept, broken} {
		if err := m.Unstage(ctx, r.VolumeID, r.StagingPath); err != nil {
			t.Fatalf("unstage %s: %v", r.VolumeID, err)
		}
	}
	for _, r := range []StageRequest{lost, broken} {
		if _, err := nbd.FindBackend(r.VolumeID); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the device of %s is still connected: %v", r.VolumeID, err)
		}
	}
	wantClean(t, kept.Path)
}

// testDeadLink: the ext4 filesystem logs an error (reported until the
// volume is staged again, whose fsck clears it); the staging mount vanishes
// (reported; publish refuses; Stage mounts it again); then someone else
// disconnects the device: the volume reports abnormal and still unstages.
func testDeadLink(t *testing.T) {
	e := newVMEnv(t, 512)
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	req := e.ploopReq(t, "ploop-dead", 64<<20, "")
	if err := m.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	wantHealthy(t, mustStats(t, m, req.VolumeID, req.StagingPath))

	// The filesystem logs an error (the kernel's test hook): abnormal, and
	// the message's remedy works: staged again, fsck clears the record.
	dev := m.get(req.VolumeID).served.Device()
	if err := os.WriteFile(filepath.Join("/sys/fs/ext4", filepath.Base(dev), "trigger_fs_error"), []byte("test\n"), 0); err != nil {
		t.Fatal(err)
	}
	wantAbnormal(t, mustStats(t, m, req.VolumeID, req.StagingPath), "logged")
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	if err := m.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	wantHealthy(t, mustStats(t, m, req.VolumeID, req.StagingPath))

	// The staging mount vanishes behind the Manager's back: no publish
	// may bind the empty directory; the next Stage mounts it again.
	if err := unix.Unmount(req.StagingPath, 0); err != nil {
		t.Fatal(err)
	}
	wantAbnormal(t, mustStats(t, m, req.VolumeID, req.StagingPath), "not mounted")
	os.MkdirAll(e.target(""), 0o750)
	if err := m.Publish(ctx, PublishRequest{VolumeID: req.VolumeID, StagingPath: req.StagingPath, TargetPath: e.target("p")}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("publish of an unmounted staging path: %v, want ErrUnavailable", err)
	}
	if err := m.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	wantHealthy(t, mustStats(t, m, req.VolumeID, req.StagingPath))

	v := m.get(req.VolumeID).served
	k, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	// The mount keeps the device configured for the kernel's status, so
	// the disconnect does not finish while it is mounted.
	index, _ := nbd.ParseDevice(v.Device())
	if err := k.Disconnect(tctx(t, 5*time.Second), index); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal(err)
	}
	// The link monitor or the server's own watch of the device may see
	// the disconnect first; either says so.
	wantAbnormal(t, mustStats(t, m, req.VolumeID, req.StagingPath), "link", "disconnected by someone else")
	if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(req.StagingPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("staging path left: %v", err)
	}
}

// testParallel: volumes staged, published, written, snapshotted, expanded,
// read for stats and unstaged concurrently, each by its own goroutine, while
// a failing request for one more volume runs alongside; none affects the
// others.
func testParallel(t *testing.T) {
	const n = 4
	e := newVMEnv(t, 1024)
	m := e.manager(t, nil)
	ctx := tctx(t, 5*time.Minute)
	reqs := make([]StageRequest, n)
	for i := range reqs {
		reqs[i] = e.ploopReq(t, fmt.Sprintf("ploop-par-%d", i), 64<<20, "")
	}
	os.MkdirAll(e.target(""), 0o750)
	bad := StageRequest{VolumeID: "ploop-par-missing", Kind: Ploop, Path: filepath.Join(e.root, "ploop", "missing"), StagingPath: filepath.Join(e.kubelet, "staging", "missing")}
	var wg sync.WaitGroup
	errs := make(chan error, n+1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := m.Stage(ctx, bad); !errors.Is(err, ErrUnavailable) {
			errs <- fmt.Errorf("stage of a missing stack: %v", err)
		}
	}()
	for i, r := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- func() error {
				if err := m.Stage(ctx, r); err != nil {
					return err
				}
				target := e.target(r.VolumeID)
				if err := m.Publish(ctx, PublishRequest{VolumeID: r.VolumeID, StagingPath: r.StagingPath, TargetPath: target}); err != nil {
					return err
				}
				data := pattern(100+i, 1<<20)
				if err := writeSynced(filepath.Join(target, "f"), data); err != nil {
					return err
				}
				if _, err := m.Snapshot(ctx, r.VolumeID); err != nil {
					return err
				}
				// A ublk device cannot grow while attached (6.12).
				if _, err := m.Expand(ctx, r.VolumeID, 96<<20, target); err != nil && (!e.ublk() || !errors.Is(err, ErrInUse)) {
					return err
				}
				st, err := m.Stats(ctx, r.VolumeID, target)
				if err != nil {
					return err
				}
				if st.Condition.Abnormal {
					return errors.New(st.Condition.Message)
				}
				if got, err := os.ReadFile(filepath.Join(target, "f")); err != nil || !bytes.Equal(got, data) {
					return fmt.Errorf("read back: %d bytes, %v", len(got), err)
				}
				if err := m.Unpublish(ctx, r.VolumeID, target); err != nil {
					return err
				}
				return m.Unstage(ctx, r.VolumeID, r.StagingPath)
			}()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for _, r := range reqs {
		wantClean(t, r.Path)
	}
}

// recordingObserver records what an Observer is told.
type recordingObserver struct {
	mu         sync.Mutex
	paused     []string
	reattached map[string]error
	ioErrors   map[string]int
}

func (r *recordingObserver) IOError(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ioErrors == nil {
		r.ioErrors = map[string]int{}
	}
	r.ioErrors[id]++
}

func (r *recordingObserver) Reattached(id string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.reattached == nil {
		r.reattached = map[string]error{}
	}
	r.reattached[id] = err
}

func (r *recordingObserver) Paused(op string, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.paused = append(r.paused, op)
}

func (r *recordingObserver) pausedOps() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.paused)
}
