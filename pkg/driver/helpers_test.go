package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr/funcr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

const (
	mib      = int64(1) << 20
	gib      = int64(1) << 30
	testNode = "node-a"
)

// fakeNode stands in for the node's attachments in unit tests of the
// translation: it keeps what is staged and published in memory and makes
// and removes target paths as the real one does, so that csi-sanity's path
// checks see the same thing. It never serves anything (ErrNotAttached for
// online operations, so the catalogue runs them offline on the real stacks).
type fakeNode struct {
	mu        sync.Mutex
	staged    map[string]StageRequest
	published map[string]map[string]PublishRequest // volume → target → request
	calls     []string
	// hook, when set, runs first in every method; an error it returns is
	// the method's, and it may panic.
	hook func(op string) error
	max  int
}

func newFakeNode() *fakeNode {
	return &fakeNode{staged: map[string]StageRequest{}, published: map[string]map[string]PublishRequest{}, max: 16}
}

func (f *fakeNode) enter(op string) error {
	f.mu.Lock()
	f.calls = append(f.calls, op)
	hook := f.hook
	f.mu.Unlock()
	if hook != nil {
		return hook(op)
	}
	return nil
}

func (f *fakeNode) Stage(ctx context.Context, req StageRequest) error {
	if err := f.enter("Stage"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if old, ok := f.staged[req.VolumeID]; ok {
		if !sameStage(old, req) {
			return fmt.Errorf("stage %s at %s: %w", req.VolumeID, req.StagingPath, ErrConflict)
		}
		return nil
	}
	if st, err := os.Stat(req.Path); err != nil || !st.IsDir() {
		return fmt.Errorf("stage %s: data %s: %v: %w", req.VolumeID, req.Path, err, ErrVolumeUnavailable)
	}
	f.staged[req.VolumeID] = req
	return nil
}

func sameStage(a, b StageRequest) bool {
	return a.VolumeID == b.VolumeID && a.Type == b.Type && a.Path == b.Path && a.StagingPath == b.StagingPath &&
		a.Block == b.Block && a.FSType == b.FSType && slices.Equal(a.MkfsOptions, b.MkfsOptions) &&
		slices.Equal(a.MountOptions, b.MountOptions) && a.OnlineDiscard == b.OnlineDiscard && a.Transport == b.Transport
}

func (f *fakeNode) Unstage(ctx context.Context, id, path string) error {
	if err := f.enter("Unstage"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.published[id]) > 0 {
		return fmt.Errorf("unstage %s: %w", id, ErrInUse)
	}
	if old, ok := f.staged[id]; ok && old.StagingPath != path {
		return fmt.Errorf("unstage %s: staged at %s, not %s: %w", id, old.StagingPath, path, ErrNotStaged)
	}
	delete(f.staged, id)
	return nil
}

func (f *fakeNode) Publish(ctx context.Context, req PublishRequest) error {
	if err := f.enter("Publish"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.staged[req.VolumeID]
	if !ok || st.StagingPath != req.StagingPath {
		return fmt.Errorf("publish %s: %w", req.VolumeID, ErrNotStaged)
	}
	if req.Block != st.Block {
		return fmt.Errorf("publish %s: staged with block=%v: %w", req.VolumeID, st.Block, ErrConflict)
	}
	targets := f.published[req.VolumeID]
	if old, ok := targets[req.TargetPath]; ok {
		if old.ReadOnly != req.ReadOnly || old.SingleWriter != req.SingleWriter || !slices.Equal(old.MountOptions, req.MountOptions) {
			return fmt.Errorf("publish %s at %s: %w", req.VolumeID, req.TargetPath, ErrConflict)
		}
		return nil
	}
	for t, old := range targets {
		if req.SingleWriter || old.SingleWriter {
			return fmt.Errorf("publish %s at %s: published at %s: %w", req.VolumeID, req.TargetPath, t, ErrOtherTarget)
		}
	}
	var err error
	if req.Block {
		var fh *os.File
		if fh, err = os.OpenFile(req.TargetPath, os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
			fh.Close()
		}
	} else if err = os.Mkdir(req.TargetPath, 0o750); errors.Is(err, os.ErrExist) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("publish %s: %w", req.VolumeID, err)
	}
	if targets == nil {
		targets = map[string]PublishRequest{}
		f.published[req.VolumeID] = targets
	}
	targets[req.TargetPath] = req
	return nil
}

func (f *fakeNode) Unpublish(ctx context.Context, id, target string) error {
	if err := f.enter("Unpublish"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.published[id], target)
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpublish %s: %w", id, err)
	}
	return nil
}

// knows reports whether path is where volume id is staged or published.
func (f *fakeNode) knows(id, path string) (StageRequest, bool) {
	st, ok := f.staged[id]
	if !ok {
		return st, false
	}
	_, pub := f.published[id][path]
	return st, st.StagingPath == path || pub
}

func (f *fakeNode) Expand(ctx context.Context, id string, size int64, path string) (int64, error) {
	if err := f.enter("Expand"); err != nil {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.knows(id, path); !ok {
		return 0, fmt.Errorf("expand %s at %s: %w", id, path, ErrNotStaged)
	}
	return size, nil
}

func (f *fakeNode) Stats(ctx context.Context, id, path string) (VolumeStats, error) {
	if err := f.enter("Stats"); err != nil {
		return VolumeStats{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.knows(id, path)
	if !ok {
		return VolumeStats{}, fmt.Errorf("stats of %s at %s: %w", id, path, ErrNotStaged)
	}
	if st.Block {
		return VolumeStats{Block: true, TotalBytes: 64 * mib, Condition: Condition{Message: "volume is healthy"}}, nil
	}
	return VolumeStats{TotalBytes: 64 * mib, UsedBytes: 5 * mib, AvailableBytes: 59 * mib,
		TotalInodes: 1000, UsedInodes: 11, FreeInodes: 989, Condition: Condition{Message: "volume is healthy"}}, nil
}

func (f *fakeNode) MaxVolumes() int { return f.max }

func (f *fakeNode) Attached(ctx context.Context, id string) (bool, error) {
	if err := f.enter("Attached"); err != nil {
		return false, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.staged[id]
	return ok, nil
}

func (f *fakeNode) Snapshot(ctx context.Context, id string) (string, error) {
	return "", f.notServed("Snapshot", id)
}

func (f *fakeNode) DeleteSnapshot(ctx context.Context, id, guid string) error {
	return f.notServed("DeleteSnapshot", id)
}

func (f *fakeNode) Grow(ctx context.Context, id string, size int64) error {
	return f.notServed("Grow", id)
}

func (f *fakeNode) Compact(ctx context.Context, id string) error { return f.notServed("Compact", id) }

// notServed: the fake serves nothing, so the catalogue runs online
// operations offline; a staged volume would be served by the real node.
func (f *fakeNode) notServed(op, id string) error {
	if err := f.enter(op); err != nil {
		return err
	}
	return fmt.Errorf("%s %s: %w", op, id, ErrNotAttached)
}

// env is a driver over a real catalogue on a temporary root and a fake
// node, served on a unix socket, with a client.
type env struct {
	root  string
	cat   *catalog.Catalog
	node  *fakeNode
	drv   *Driver
	conn  *grpc.ClientConn
	id    csi.IdentityClient
	ctl   csi.ControllerClient
	nd    csi.NodeClient
	sock  string
	logs  *logLines
	kdir  string // a directory for staging and target paths
	close func()
}

type envOptions struct {
	overcommit float64
	prefixes   []string
	tidy       time.Duration
}

// logLines collects what the driver logs (funcr, verbosity 2).
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) add(prefix, args string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, prefix+" "+args)
}

func (l *logLines) matching(substr string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			out = append(out, s)
		}
	}
	return out
}

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	e := &env{root: t.TempDir(), node: newFakeNode(), logs: &logLines{}, kdir: t.TempDir()}
	cat, err := catalog.Open(e.root, catalog.Options{OvercommitRatio: o.overcommit, Online: OnlineOf(e.node)})
	if err != nil {
		t.Fatal(err)
	}
	e.cat = cat
	log := funcr.New(e.logs.add, funcr.Options{Verbosity: 2})
	tidy := o.tidy
	if tidy == 0 {
		tidy = -1
	}
	e.drv, err = New(Config{Version: "v0.0.0-test", NodeID: testNode, Catalog: cat, Node: e.node,
		PathPrefixes: o.prefixes, TidyInterval: tidy, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "csi")
	if err != nil {
		t.Fatal(err)
	}
	e.sock = filepath.Join(sockDir, "csi.sock")
	lis, err := listenTest(e.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- e.drv.Serve(ctx, lis) }()
	e.conn, err = grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	e.id, e.ctl, e.nd = csi.NewIdentityClient(e.conn), csi.NewControllerClient(e.conn), csi.NewNodeClient(e.conn)
	closed := false
	e.close = func() {
		if closed {
			return
		}
		closed = true
		e.conn.Close()
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if err := cat.Close(); err != nil {
			t.Errorf("close the catalogue: %v", err)
		}
		os.RemoveAll(sockDir)
	}
	t.Cleanup(e.close)
	return e
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// mountCap is a mount capability with a mode and filesystem.
func mountCap(mode csi.VolumeCapability_AccessMode_Mode, fs string, flags ...string) *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs, MountFlags: flags}}}
}

func blockCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}}
}

const snw = csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER

func (e *env) create(t testing.TB, name string, size int64, params map[string]string, caps ...*csi.VolumeCapability) *csi.Volume {
	t.Helper()
	if len(caps) == 0 {
		caps = []*csi.VolumeCapability{mountCap(snw, "")}
	}
	r, err := e.ctl.CreateVolume(ctxT(t), &csi.CreateVolumeRequest{Name: name, Parameters: params,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: caps})
	if err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return r.GetVolume()
}

// wantCode checks an RPC's error code (and, when set, that the message
// contains substr).
func wantCode(t testing.TB, what string, err error, want codes.Code, substr string) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("%s: code %v (%v), want %v", what, got, err, want)
	}
	if substr != "" && !strings.Contains(status.Convert(err).Message(), substr) {
		t.Fatalf("%s: message %q does not say %q", what, status.Convert(err).Message(), substr)
	}
}

func listenTest(path string) (net.Listener, error) {
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	return l, os.Chmod(path, 0o600)
}

func codeOfErr(err error) codes.Code { return status.Code(err) }
