package attachments

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
	"k8s.io/klog/v2/ktesting"
)

// fakeDirs stands in for a simfs root in host tests of the Manager's
// logic (the host kernel has no project quota); the VM tests use a real
// simfs.Root.
type fakeDirs struct {
	root string
	mu   sync.Mutex
	use  map[string]simfs.Usage
}

func (d *fakeDirs) VolumePath(id string) (string, error) {
	if err := simfs.ValidateID(id); err != nil {
		return "", err
	}
	return filepath.Join(d.root, id), nil
}

func (d *fakeDirs) Usage(id string) (simfs.Usage, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	u, ok := d.use[id]
	if !ok {
		return u, fmt.Errorf("volume %s: %w", id, simfs.ErrNotFound)
	}
	return u, nil
}

func (d *fakeDirs) QuotaEnforced() error { return nil }

// hostEnv is a storage root, kubelet directory and simfs stand-in in a
// temporary directory.
type hostEnv struct {
	root, kubelet string
	dirs          *fakeDirs
}

func newHostEnv(t *testing.T) *hostEnv {
	base := t.TempDir()
	e := &hostEnv{root: filepath.Join(base, "root"), kubelet: filepath.Join(base, "kubelet")}
	e.dirs = &fakeDirs{root: filepath.Join(e.root, "simfs", "volumes"), use: map[string]simfs.Usage{}}
	for _, d := range []string{e.root, e.kubelet, e.dirs.root} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func (e *hostEnv) options(t *testing.T) Options {
	return Options{
		StorageRoot: e.root, NodeID: "node-1", PathPrefixes: []string{e.kubelet},
		Dirs: e.dirs, Logger: ktesting.NewLogger(t, ktesting.NewConfig(ktesting.Verbosity(2))),
	}
}

func (e *hostEnv) newManager(t *testing.T) *Manager {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m, err := New(ctx, e.options(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// simfsVolume makes the directory of a simfs volume with a quota.
func (e *hostEnv) simfsVolume(t *testing.T, id string, limit uint64) StageRequest {
	t.Helper()
	p, _ := e.dirs.VolumePath(id)
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	e.dirs.mu.Lock()
	e.dirs.use[id] = simfs.Usage{Bytes: 4096, Inodes: 1, BytesLimit: limit, InodesLimit: 1000}
	e.dirs.mu.Unlock()
	return StageRequest{VolumeID: id, Kind: Simfs, Path: p, StagingPath: filepath.Join(e.kubelet, "staging", id)}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestNewRefusesOptions(t *testing.T) {
	e := newHostEnv(t)
	for _, tc := range []struct {
		name string
		mod  func(o *Options)
	}{
		{"relative root", func(o *Options) { o.StorageRoot = "root" }},
		{"missing root", func(o *Options) { o.StorageRoot = filepath.Join(e.root, "nope") }},
		{"no node id", func(o *Options) { o.NodeID = "" }},
		{"node id escapes", func(o *Options) { o.NodeID = "../x" }},
		{"fractional timeout", func(o *Options) { o.Attach.DeadConnTimeout = 1500 * time.Millisecond }},
		{"negative trim", func(o *Options) { o.TrimInterval = -time.Second }},
		{"relative prefix", func(o *Options) { o.PathPrefixes = []string{"kubelet"} }},
		{"transport", func(o *Options) { o.Attach.Transport = "iscsi" }},
		{"ublk queues", func(o *Options) { o.Attach.UblkQueues = 65 }},
	} {
		o := e.options(t)
		tc.mod(&o)
		if m, err := New(ctxT(t), o); !errors.Is(err, ErrInvalid) {
			if m != nil {
				m.Close()
			}
			t.Errorf("%s: New = %v, want ErrInvalid", tc.name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(e.root, "nodes")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused options created the state directory: %v", err)
	}
}

// TestTransportWithoutUblk: on a kernel without ublk (this host's), auto
// falls back to nbd, an explicit ublk default fails New with the reason,
// and a volume that asks for ublk is refused before anything is recorded.
func TestTransportWithoutUblk(t *testing.T) {
	if _, err := os.Stat("/dev/ublk-control"); err == nil {
		t.Skip("this kernel has ublk: the VM tests cover it")
	}
	e := newHostEnv(t)
	o := e.options(t)
	o.Attach.Transport = TransportUblk
	if m, err := New(ctxT(t), o); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "ublk") {
		if m != nil {
			m.Close()
		}
		t.Fatalf("New with ublk on a kernel without it = %v, want ErrInvalid naming ublk", err)
	}
	o.Attach.Transport = TransportAuto
	m, err := New(ctxT(t), o)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if def, ok := m.Transport(); def != TransportNBD || ok {
		t.Fatalf("auto without ublk: default %q, ublk %v; want nbd, false", def, ok)
	}
	dir := filepath.Join(e.root, "ploop", "u")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	req := StageRequest{VolumeID: "u", Kind: Ploop, Path: dir, StagingPath: filepath.Join(e.kubelet, "staging", "u"), Transport: TransportUblk}
	if err := m.Stage(ctxT(t), req); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "ublk") {
		t.Fatalf("stage through ublk = %v, want ErrUnavailable naming ublk", err)
	}
	if ok, _ := m.Attached(ctxT(t), "u"); ok {
		t.Fatal("a refused stage left a record")
	}
}

// TestSimfsLifecycle: stage, repeat, conflicting repeat, stats from the
// quota, restart, unstage and its repeat, on the host (no mounts: simfs
// staging mounts nothing).
func TestSimfsLifecycle(t *testing.T) {
	e := newHostEnv(t)
	m := e.newManager(t)
	req := e.simfsVolume(t, "simfs-a", 1<<20)
	ctx := ctxT(t)
	for i := range 2 {
		if err := m.Stage(ctx, req); err != nil {
			t.Fatalf("stage #%d: %v", i+1, err)
		}
	}
	other := req
	other.StagingPath += "-2"
	if err := m.Stage(ctx, other); !errors.Is(err, ErrConflict) {
		t.Fatalf("stage at another staging path: %v, want ErrConflict", err)
	}
	st, err := m.Stats(ctx, req.VolumeID, req.StagingPath)
	if err != nil {
		t.Fatal(err)
	}
	if st.TotalBytes != 1<<20 || st.UsedBytes != 4096 || st.AvailableBytes != 1<<20-4096 || st.TotalInodes != 1000 || st.FreeInodes != 999 {
		t.Fatalf("stats from the quota: %+v", st)
	}
	if st.Condition.Abnormal {
		t.Fatalf("healthy volume reported abnormal: %s", st.Condition.Message)
	}
	if _, err := m.Stats(ctx, req.VolumeID, filepath.Join(e.kubelet, "elsewhere")); !errors.Is(err, ErrNotStaged) {
		t.Fatalf("stats at a path the volume is not at: %v", err)
	}
	// Staged, it must not be deleted: the catalogue asks Attached.
	if ok, err := m.Attached(ctx, req.VolumeID); err != nil || !ok {
		t.Fatalf("Attached of a staged simfs volume = %t, %v", ok, err)
	}

	// A restart keeps the volume.
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Stage(ctx, req); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("stage after Close: %v", err)
	}
	m = e.newManager(t)
	if _, err := m.Stats(ctx, req.VolumeID, req.StagingPath); err != nil {
		t.Fatalf("stats after restart: %v", err)
	}
	if err := m.Unstage(ctx, req.VolumeID, other.StagingPath); !errors.Is(err, ErrNotStaged) {
		t.Fatalf("unstage from another staging path: %v", err)
	}
	for i := range 2 {
		if err := m.Unstage(ctx, req.VolumeID, req.StagingPath); err != nil {
			t.Fatalf("unstage #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(filepath.Join(e.root, "nodes", "node-1", "volumes", req.VolumeID+".json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record left after unstage: %v", err)
	}
	if _, err := m.Stats(ctx, req.VolumeID, req.StagingPath); !errors.Is(err, ErrNotStaged) {
		t.Fatalf("stats after unstage: %v", err)
	}
	if ok, err := m.Attached(ctx, req.VolumeID); err != nil || ok {
		t.Fatalf("Attached after unstage = %t, %v", ok, err)
	}
}

func TestSimfsStageChecksQuota(t *testing.T) {
	e := newHostEnv(t)
	m := e.newManager(t)
	ctx := ctxT(t)
	req := e.simfsVolume(t, "simfs-noquota", 0)
	if err := m.Stage(ctx, req); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("stage without a quota limit: %v", err)
	}
	gone := StageRequest{VolumeID: "simfs-gone", Kind: Simfs, Path: filepath.Join(e.dirs.root, "simfs-gone"), StagingPath: filepath.Join(e.kubelet, "s")}
	if err := m.Stage(ctx, gone); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("stage of a missing directory: %v", err)
	}
	wrong := e.simfsVolume(t, "simfs-b", 1<<20)
	wrong.Path = filepath.Join(e.root, "elsewhere")
	os.Mkdir(wrong.Path, 0o755)
	if err := m.Stage(ctx, wrong); !errors.Is(err, ErrInvalid) {
		t.Fatalf("stage of a directory the simfs root does not name: %v", err)
	}
	noDirs := e.options(t)
	noDirs.Dirs = nil
	noDirs.StateDir = filepath.Join(e.root, "nodes", "other")
	m2, err := New(ctx, noDirs)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if err := m2.Stage(ctx, e.simfsVolume(t, "simfs-c", 1<<20)); !errors.Is(err, ErrInvalid) {
		t.Fatalf("simfs stage without a simfs root: %v", err)
	}
}

// TestHostileRequests: ids and paths that could escape are refused
// before anything touches the filesystem.
func TestHostileRequests(t *testing.T) {
	e := newHostEnv(t)
	m := e.newManager(t)
	ctx := ctxT(t)
	good := e.simfsVolume(t, "simfs-h", 1<<20)
	long := strings.Repeat("a", MaxIDLength+1)
	for _, tc := range []struct {
		name string
		mod  func(r *StageRequest)
	}{
		{"dotdot id", func(r *StageRequest) { r.VolumeID = "../x" }},
		{"slash id", func(r *StageRequest) { r.VolumeID = "a/b" }},
		{"nul id", func(r *StageRequest) { r.VolumeID = "a\x00b" }},
		{"long id", func(r *StageRequest) { r.VolumeID = long }},
		{"dot id", func(r *StageRequest) { r.VolumeID = ".hidden" }},
		{"relative staging", func(r *StageRequest) { r.StagingPath = "staging" }},
		{"unclean staging", func(r *StageRequest) { r.StagingPath = e.kubelet + "/a/../b" }},
		{"staging outside prefix", func(r *StageRequest) { r.StagingPath = "/etc/x" }},
		{"staging is the prefix", func(r *StageRequest) { r.StagingPath = e.kubelet }},
		{"staging in root", func(r *StageRequest) { r.StagingPath = filepath.Join(e.root, "x") }},
		{"volume outside root", func(r *StageRequest) { r.Path = "/etc" }},
		{"volume is root", func(r *StageRequest) { r.Path = e.root }},
		{"volume in state dir", func(r *StageRequest) { r.Path = filepath.Join(e.root, "nodes", "node-1", "volumes") }},
		{"volume relative", func(r *StageRequest) { r.Path = "simfs/x" }},
		{"kind", func(r *StageRequest) { r.Kind = "lvm" }},
		{"simfs block", func(r *StageRequest) { r.Block = true }},
		{"simfs fs", func(r *StageRequest) { r.FSType = FSExt4 }},
		{"ploop fs", func(r *StageRequest) { r.Kind = Ploop; r.FSType = "btrfs" }},
		{"ploop transport", func(r *StageRequest) { r.Kind = Ploop; r.Transport = "iscsi" }},
		{"ploop transport auto", func(r *StageRequest) { r.Kind = Ploop; r.Transport = TransportAuto }},
		{"simfs transport", func(r *StageRequest) { r.Transport = TransportNBD }},
		{"ploop block fs", func(r *StageRequest) { r.Kind = Ploop; r.Block = true; r.FSType = FSExt4 }},
		{"mount option nul", func(r *StageRequest) { r.Kind = Ploop; r.MountOptions = []string{"a\x00"} }},
		{"many options", func(r *StageRequest) { r.Kind = Ploop; r.MkfsOptions = make([]string, maxOptions+1) }},
	} {
		r := good
		tc.mod(&r)
		if err := m.Stage(ctx, r); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: Stage = %v, want ErrInvalid", tc.name, err)
		}
	}
	ents, err := os.ReadDir(filepath.Join(e.root, "nodes", "node-1", "volumes"))
	if err != nil || len(ents) != 0 {
		t.Fatalf("refused requests left records: %v %v", ents, err)
	}
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"unstage", m.Unstage(ctx, "../x", good.StagingPath)},
		{"unstage path", m.Unstage(ctx, good.VolumeID, "/etc")},
		{"publish", m.Publish(ctx, PublishRequest{VolumeID: good.VolumeID, StagingPath: good.StagingPath, TargetPath: e.root + "/t"})},
		{"publish on staging", m.Publish(ctx, PublishRequest{VolumeID: good.VolumeID, StagingPath: good.StagingPath, TargetPath: good.StagingPath})},
		{"unpublish", m.Unpublish(ctx, good.VolumeID, "/")},
		{"expand size", func() error { _, err := m.Expand(ctx, good.VolumeID, -1, good.StagingPath); return err }()},
		{"grow size", m.Grow(ctx, good.VolumeID, 1<<62)},
		{"stats", func() error { _, err := m.Stats(ctx, "a/b", good.StagingPath); return err }()},
		{"snapshot", func() error { _, err := m.Snapshot(ctx, ""); return err }()},
	} {
		if !errors.Is(tc.err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", tc.name, tc.err)
		}
	}
}

// TestRecoverReportsProblems: records whose volume cannot come back are
// kept and reported abnormal, with a message that says what to do; the
// unreadable one is cleared by Unstage. Nothing on the host serves nbd, so
// a ploop volume that needs attaching again fails that way too.
func TestRecoverReportsProblems(t *testing.T) {
	e := newHostEnv(t)
	stateDir := filepath.Join(e.root, "nodes", "node-1")
	s, err := openStateDir(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	staging := func(id string) string { return filepath.Join(e.kubelet, "staging", id) }
	gone := record{Version: recordVersion, VolumeID: "ploop-gone", Kind: Ploop, Path: filepath.Join(e.root, "ploop", "ploop-gone"),
		StagingPath: staging("ploop-gone"), FSType: FSExt4, Device: "/dev/nbd7", Staged: true}
	notStack := gone
	notStack.VolumeID, notStack.Path, notStack.StagingPath = "ploop-notstack", filepath.Join(e.root, "ploop", "ploop-notstack"), staging("ploop-notstack")
	os.MkdirAll(notStack.Path, 0o700)
	outside := gone
	outside.VolumeID, outside.Path, outside.StagingPath = "ploop-outside", "/etc", staging("ploop-outside")
	half := gone
	half.VolumeID, half.StagingPath, half.Staged, half.Device = "ploop-half", staging("ploop-half"), false, ""
	damaged := gone
	damaged.VolumeID, damaged.Path, damaged.StagingPath = "ploop-damaged", filepath.Join(e.root, "ploop", "ploop-damaged"), staging("ploop-damaged")
	os.MkdirAll(damaged.Path, 0o700)
	os.WriteFile(filepath.Join(damaged.Path, ploop.DescriptorName), []byte("<Parallels_disk_image>"), 0o600)
	simGone := record{Version: recordVersion, VolumeID: "simfs-gone", Kind: Simfs, Path: filepath.Join(e.dirs.root, "simfs-gone"), StagingPath: staging("simfs-gone"), Staged: true}
	for _, r := range []record{gone, notStack, outside, half, damaged, simGone} {
		if err := s.write(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(s.recordPath("ploop-junk"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.close()

	m := e.newManager(t)
	ctx := ctxT(t)
	for id, want := range map[string]string{
		"ploop-gone":     "is gone",
		"ploop-notstack": "no longer a ploop stack",
		"ploop-outside":  "outside the storage root",
		"ploop-junk":     "unreadable",
		"ploop-damaged":  "ploopctl check --repair",
		"simfs-gone":     "is gone",
	} {
		path := staging(id)
		st, err := m.Stats(ctx, id, path)
		if err != nil {
			t.Fatalf("stats of %s: %v", id, err)
		}
		if !st.Condition.Abnormal || !strings.Contains(st.Condition.Message, want) {
			t.Errorf("%s: condition %+v, want abnormal with %q", id, st.Condition, want)
		}
	}
	// A staging that never attached is no problem until it is used.
	if st, err := m.Stats(ctx, "ploop-half", staging("ploop-half")); err != nil || !st.Condition.Abnormal {
		t.Errorf("half-staged volume: %+v, %v", st, err)
	}
	if err := m.Stage(ctx, StageRequest{VolumeID: "ploop-junk", Kind: Ploop, Path: filepath.Join(e.root, "x"), StagingPath: staging("ploop-junk")}); err == nil {
		t.Error("stage over an unreadable record succeeded")
	}
	if err := m.Unstage(ctx, "ploop-junk", filepath.Join(e.kubelet, "whatever")); err != nil {
		t.Fatalf("unstage of an unreadable record: %v", err)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "volumes", "ploop-junk.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("unreadable record not cleared: %v", err)
	}
	if err := m.Unstage(ctx, "ploop-half", staging("ploop-half")); err != nil {
		t.Fatalf("unstage of a staging that never attached: %v", err)
	}
}

// TestBusyAndParallel: an operation waits for the volume's lock only as
// long as its context allows; other volumes are not held up.
func TestBusyAndParallel(t *testing.T) {
	e := newHostEnv(t)
	m := e.newManager(t)
	a := e.simfsVolume(t, "simfs-busy", 1<<20)
	b := e.simfsVolume(t, "simfs-free", 1<<20)
	unlock, err := m.lockVolume(ctxT(t), a.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := m.Stage(short, a); !errors.Is(err, ErrBusy) {
		t.Fatalf("stage of a locked volume: %v, want ErrBusy", err)
	}
	if err := m.Stage(ctxT(t), b); err != nil {
		t.Fatalf("another volume while one is locked: %v", err)
	}
	unlock()
	if err := m.Stage(ctxT(t), a); err != nil {
		t.Fatal(err)
	}
}

// TestMaxVolumesHost: without the nbd driver the count is 0 (unknown).
func TestMaxVolumesHost(t *testing.T) {
	e := newHostEnv(t)
	m := e.newManager(t)
	devs, _ := filepath.Glob("/sys/block/nbd*")
	if n := m.MaxVolumes(); n < len(devs) {
		t.Fatalf("MaxVolumes = %d with %d nbd devices", n, len(devs))
	}
}

func TestRecordDiffers(t *testing.T) {
	base := ploopRecord()
	base.Targets, base.Device, base.Staged = nil, "", false
	for _, tc := range []struct {
		want string
		mod  func(r *record)
	}{
		{"", func(r *record) {}},
		{"", func(r *record) { r.Device = "/dev/nbd1"; r.Staged = true; r.Targets = []target{{Path: "/t"}} }},
		{"kind", func(r *record) { r.Kind = Simfs }},
		{"volume path", func(r *record) { r.Path += "x" }},
		{"staging path", func(r *record) { r.StagingPath += "x" }},
		{"access type (block or filesystem)", func(r *record) { r.Block = true }},
		{"filesystem", func(r *record) { r.FSType = FSExt4 }},
		{"mkfs options", func(r *record) { r.MkfsOptions = nil }},
		{"mount options", func(r *record) { r.MountOptions = []string{"noatime", "nodev"} }},
		{"discard mode", func(r *record) { r.OnlineDiscard = false }},
	} {
		r := base.clone()
		tc.mod(&r)
		if got := r.differs(base); got != tc.want {
			t.Errorf("differs = %q, want %q", got, tc.want)
		}
	}
}
