package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
)

func TestParseEndpoint(t *testing.T) {
	for in, want := range map[string]string{
		"unix:///csi/csi.sock": "/csi/csi.sock",
		"unix:/csi/csi.sock":   "/csi/csi.sock",
	} {
		if got, err := parseEndpoint(in); err != nil || got != want {
			t.Errorf("parseEndpoint(%q) = %q, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "/csi/csi.sock", "tcp://127.0.0.1:10000", "127.0.0.1:10000", "unix://csi.sock",
		"unix://host/csi.sock", "unix:///csi/../etc/x", "unix:///csi//x", "unix:///" + strings.Repeat("s", 200), "unix:///a\x00b", "dns:///x"} {
		if got, err := parseEndpoint(in); err == nil {
			t.Errorf("parseEndpoint(%q) = %q, want an error", in, got)
		}
	}
}

func FuzzParseEndpoint(f *testing.F) {
	for _, s := range []string{"unix:///csi/csi.sock", "unix:/x", "tcp://:1", "unix://"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ep string) {
		p, err := parseEndpoint(ep)
		if err != nil {
			return
		}
		if !strings.HasPrefix(ep, "unix:") || !filepath.IsAbs(p) || filepath.Clean(p) != p || len(p) > maxSocketPath || strings.ContainsRune(p, 0) {
			t.Fatalf("parseEndpoint(%q) = %q", ep, p)
		}
	})
}

// TestUsage: what the command refuses before it touches anything, and how.
func TestUsage(t *testing.T) {
	root := t.TempDir()
	for _, tc := range []struct {
		args   []string
		code   int
		output string
	}{
		{[]string{"--version"}, exitOK, "ploop-csi " + buildVersion()},
		{[]string{"--help"}, exitOK, "-overcommit-ratio float"},
		{[]string{"--storage-root", root}, exitUsage, "--nodeid is required"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--endpoint", "tcp://0.0.0.0:9000"}, exitUsage, "no network port"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--mode", "controller"}, exitFail, "pass --kubeconfig"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--mode", "node", "--kubeconfig", filepath.Join(root, "nope")}, exitFail, "--kubeconfig"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--mode", "both"}, exitUsage, "want all"},
		{[]string{"--nodeid", "n", "--storage-root", "rel/root"}, exitUsage, "absolute"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--nbd-timeout", "1500ms"}, exitUsage, "whole seconds"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--trim-interval", "-1s"}, exitUsage, "negative"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--bogus"}, exitUsage, "bogus"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--attach", "iscsi"}, exitUsage, "want nbd, ublk or auto"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--attach", ""}, exitUsage, "want nbd, ublk or auto"},
		{[]string{"--nodeid", "n", "--storage-root", root, "--ublk-queues", "65"}, exitUsage, "--ublk-queues"},
		{[]string{"--help"}, exitOK, "-attach string"},
		{[]string{"--nodeid", "n", "--storage-root", root, "extra"}, exitUsage, "unexpected"},
		{[]string{"--nodeid", "n", "--storage-root", root + "/missing", "--endpoint", "unix://" + root + "/s.sock"}, exitFail, "does not exist"},
	} {
		var out bytes.Buffer
		code := run(context.Background(), func() {}, tc.args, &out, &out, func(context.Context, nodeConfig) (nodeAttachments, error) {
			return &testNode{}, nil
		})
		if code != tc.code || !strings.Contains(out.String(), tc.output) {
			t.Errorf("ploop-csi %q: exit %d, want %d; output does not say %q:\n%s", tc.args, code, tc.code, tc.output, out.String())
		}
	}
	if entries, _ := os.ReadDir(root); len(entries) != 0 {
		t.Errorf("refused runs left %v in the root", entries)
	}
}

// testNode is the node's attachments for tests of the command: nothing is
// ever attached; Close is counted.
type testNode struct {
	driver.Node
	closed atomic.Int32
	cfg    nodeConfig
}

func (n *testNode) Close() error                                          { n.closed.Add(1); return nil }
func (n *testNode) Attached(ctx context.Context, id string) (bool, error) { return false, nil }
func (n *testNode) MaxVolumes() int                                       { return 8 }

// shortDir is a temporary directory with a path short enough for a socket.
func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "pc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// dial connects to a socket that may not exist yet: the call waits for
// the server (bounded by ctx), no polling loop needed.
func dial(t *testing.T, ctx context.Context, sock string) (*grpc.ClientConn, csi.IdentityClient) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	id := csi.NewIdentityClient(conn)
	if _, err := id.Probe(ctx, &csi.ProbeRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("probe %s: %v", sock, err)
	}
	return conn, id
}

// TestServe: the command serves on a 0600 socket, starts the node before
// answering, stops on its context (a signal in main), closes the node
// without detaching, and leaves the socket and the root's lock behind it.
func TestServe(t *testing.T) {
	root, sock := t.TempDir(), filepath.Join(shortDir(t), "csi.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	node := &testNode{}
	var stopped atomic.Int32
	done := make(chan int, 1)
	var out bytes.Buffer
	go func() {
		done <- run(ctx, func() { stopped.Add(1) }, []string{"--nodeid", "node-1", "--storage-root", root, "--endpoint", "unix://" + sock,
			"--drivername", "test.ploop.io", "--trim-interval", "0", "--nbd-timeout", "30s"}, &out, &out,
			func(ctx context.Context, cfg nodeConfig) (nodeAttachments, error) {
				node.cfg = cfg
				return node, nil
			})
	}()
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	conn, id := dial(t, wctx, sock)
	st, err := os.Lstat(sock)
	if err != nil || st.Mode().Type() != os.ModeSocket || st.Mode().Perm() != 0o600 {
		t.Errorf("socket %s: %v %v, want a 0600 socket", sock, st.Mode(), err)
	}
	info, err := id.GetPluginInfo(wctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.GetName() != "test.ploop.io" || info.GetVendorVersion() != buildVersion() {
		t.Errorf("plugin info %v %v", info, err)
	}
	ni, err := csi.NewNodeClient(conn).NodeGetInfo(wctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.GetNodeId() != "node-1" || ni.GetMaxVolumesPerNode() != 8 {
		t.Errorf("node info %v %v", ni, err)
	}
	if c := node.cfg; c.StorageRoot != root || c.NodeID != "node-1" || c.TrimInterval != 0 || c.NBDTimeout != 30*time.Second || !c.DirectIO || c.Dirs == nil {
		t.Errorf("node config %+v", c)
	}
	// A second instance on the same socket is refused, and so is a second
	// catalogue on the same root.
	var out2 bytes.Buffer
	if code := run(ctx, func() {}, []string{"--nodeid", "n", "--storage-root", root, "--endpoint", "unix://" + sock}, &out2, &out2,
		func(context.Context, nodeConfig) (nodeAttachments, error) { return &testNode{}, nil }); code != exitFail ||
		!strings.Contains(out2.String(), "another process") {
		t.Errorf("second instance: exit %d: %s", code, out2.String())
	}

	cancel()
	if code := <-done; code != exitOK {
		t.Fatalf("exit %d: %s", code, out.String())
	}
	if stopped.Load() == 0 {
		t.Error("the signal handler was not released")
	}
	if n := node.closed.Load(); n != 1 {
		t.Errorf("node closed %d times", n)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	c, err := catalog.Open(root, catalog.Options{})
	if err != nil {
		t.Fatalf("the root's catalogue is still locked: %v", err)
	}
	c.Close()
}

func TestListenUnix(t *testing.T) {
	dir := shortDir(t)
	// A stale socket (nobody listening) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	l2, closeFn, err := listenUnix(stale)
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	// A live one is not.
	if _, _, err := listenUnix(stale); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Errorf("live socket: %v", err)
	}
	l2.Close()
	if err := closeFn(); err != nil {
		t.Error(err)
	}
	// Nor is anything that is not a socket.
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := listenUnix(file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "keep" {
		t.Error("the file was touched")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("left %v", ents)
	}
}

// TestBinary builds ploop-csi with a version set by the linker and runs it:
// --version and GetPluginInfo report it, and SIGTERM stops it cleanly.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the command")
	}
	bin := filepath.Join(t.TempDir(), "ploop-csi")
	const ver = "v9.9.9-test"
	build := exec.Command("go", "build", "-ldflags", "-X main.version="+ver, "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin, "--version").Output(); err != nil || string(out) != "ploop-csi "+ver+"\n" {
		t.Fatalf("--version: %q %v", out, err)
	}
	root, sock := t.TempDir(), filepath.Join(shortDir(t), "csi.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--nodeid", "n", "--storage-root", root, "--endpoint", "unix://"+sock, "--v", "2")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	_, id := dial(t, ctx, sock)
	info, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.GetVendorVersion() != ver || info.GetName() != driver.DefaultName {
		t.Errorf("plugin info %v %v", info, err)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("after SIGTERM: %v\n%s", err, out.String())
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	for _, want := range []string{`"serving CSI"`, `endpoint="` + sock + `"`, `"CSI call" logger="driver" method="GetPluginInfo"`, "stopped"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, out.String())
		}
	}
}
