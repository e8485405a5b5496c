package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

// freeAddr is a loopback address with a port nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// lockedBuffer is a process's output, written by its goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// process is one ploop-csi run in this test process.
type process struct {
	cancel context.CancelFunc
	done   chan int
	out    *lockedBuffer
}

func start(t *testing.T, args []string, newNode newNodeFunc) *process {
	ctx, cancel := context.WithCancel(context.Background())
	p := &process{cancel: cancel, done: make(chan int, 1), out: &lockedBuffer{}}
	go func() { p.done <- run(ctx, func() {}, args, p.out, p.out, newNode) }()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-p.done:
			if code != exitOK {
				t.Errorf("ploop-csi %s exited %d:\n%s", strings.Join(args, " "), code, p.out.String())
			}
		case <-time.After(time.Minute):
			t.Errorf("ploop-csi %s did not stop", strings.Join(args, " "))
		}
	})
	return p
}

func writeKubeconfig(t *testing.T, srv *kubeapi.Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := srv.WriteKubeconfig(path); err != nil {
		t.Fatal(err)
	}
	return path
}

func httpGet(ctx context.Context, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func eventually(t *testing.T, ctx context.Context, what string, ok func() error) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if last = ok(); last == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: %v (last: %v)", what, ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// startAPI starts a real API server with the project's CRDs.
func startAPI(t *testing.T) (*kubeapi.Server, client.Client) {
	t.Helper()
	srv := kubeapi.StartT(t, kubeapi.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := srv.InstallCRDs(ctx, filepath.Join("..", "..", "charts", "ploop-csi", "crds", "*.yaml")); err != nil {
		t.Fatal(err)
	}
	c, _, err := srv.Client(v1alpha1.AddToScheme)
	if err != nil {
		t.Fatal(err)
	}
	return srv, c
}

// TestClusterModes runs the binary's two cluster halves against a real
// API server: a node plugin (its attachments stand in: no nbd here) and a
// controller. A CSI CreateVolume at the controller lands on the node's
// storage root; both serve /healthz, /readyz and the node /metrics; the
// controller holds the leader Lease; both stop cleanly.
func TestClusterModes(t *testing.T) {
	srv, c := startAPI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}); err != nil {
		t.Fatal(err)
	}
	kc := writeKubeconfig(t, srv)
	root, dir := t.TempDir(), shortDir(t)
	nodeSock, ctlSock := filepath.Join(dir, "node.sock"), filepath.Join(dir, "ctl.sock")
	nodeMetrics, nodeHealth, ctlMetrics, ctlHealth := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)

	node := &testNode{}
	regDir := filepath.Join(dir, "registry")
	if err := os.Mkdir(regDir, 0o700); err != nil {
		t.Fatal(err)
	}
	start(t, []string{"--mode", "node", "--nodeid", "node-1", "--storage-root", root, "--endpoint", "unix://" + nodeSock,
		"--kubeconfig", kc, "--metrics-address", nodeMetrics, "--health-address", nodeHealth, "--trim-interval", "0",
		"--registration-dir", regDir, "--kubelet-registration-path", "/var/lib/kubelet/plugins/csi.ploop.io/csi.sock"},
		func(ctx context.Context, cfg nodeConfig) (nodeAttachments, error) { node.cfg = cfg; return node, nil })
	start(t, []string{"--mode", "controller", "--nodeid", "controller-0", "--endpoint", "unix://" + ctlSock,
		"--kubeconfig", kc, "--metrics-address", ctlMetrics, "--health-address", ctlHealth, "--leader-election-namespace", "default"}, nil)

	// The kubelet's side of the built-in registration: the node plugin is
	// not ready until the kubelet has registered it.
	regSock := filepath.Join(regDir, "csi.ploop.io-reg.sock")
	eventually(t, ctx, "the registration socket", func() error { _, err := os.Stat(regSock); return err })
	if code, _, err := httpGet(ctx, "http://"+nodeHealth+"/readyz"); err == nil && code == http.StatusOK {
		t.Error("the node plugin is ready before the kubelet registered it")
	}
	regConn, err := grpc.NewClient("unix://"+regSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer regConn.Close()
	kubelet := registerapi.NewRegistrationClient(regConn)
	if info, err := kubelet.GetInfo(ctx, &registerapi.InfoRequest{}); err != nil ||
		info.GetName() != "csi.ploop.io" || info.GetEndpoint() != "/var/lib/kubelet/plugins/csi.ploop.io/csi.sock" {
		t.Fatalf("GetInfo: %v, %v", info, err)
	}
	if _, err := kubelet.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(regSock); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("registration socket: %v, %v; want mode 0600", st, err)
	}
	for _, addr := range []string{nodeHealth, ctlHealth} {
		for _, path := range []string{"/healthz", "/readyz"} {
			eventually(t, ctx, addr+path, func() error {
				code, body, err := httpGet(ctx, "http://"+addr+path)
				if err == nil && code != http.StatusOK {
					err = fmt.Errorf("%d %s", code, body)
				}
				return err
			})
		}
	}

	ctlConn, ctlID := dial(t, ctx, ctlSock)
	nodeConn, nodeID := dial(t, ctx, nodeSock)
	for name, id := range map[string]csi.IdentityClient{"controller": ctlID, "node": nodeID} {
		if _, err := id.Probe(ctx, &csi.ProbeRequest{}); err != nil {
			t.Errorf("%s probe: %v", name, err)
		}
	}
	if _, err := csi.NewControllerClient(nodeConn).ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{}); status.Code(err) != codes.Unimplemented {
		t.Errorf("the node plugin serves controller calls: %v", err)
	}
	ni, err := csi.NewNodeClient(nodeConn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.GetAccessibleTopology().GetSegments()[driver.TopologyKey] != "node-1" {
		t.Errorf("NodeGetInfo: %v, %v", ni, err)
	}

	ctl := csi.NewControllerClient(ctlConn)
	seg := &csi.Topology{Segments: map[string]string{driver.TopologyKey: "node-1"}}
	resp, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name:          "pvc-0001",
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		}},
		AccessibilityRequirements: &csi.TopologyRequirement{Preferred: []*csi.Topology{seg}, Requisite: []*csi.Topology{seg}},
	})
	if err != nil {
		t.Fatalf("CreateVolume at the controller: %v\nnode:\n%s", err, "")
	}
	id := resp.GetVolume().GetVolumeId()
	if _, err := catalog.ParseVolumeID(id); err != nil {
		t.Fatalf("volume id %q: %v", id, err)
	}
	if _, err := os.Stat(filepath.Join(root, "ploop", "volumes", id)); err != nil {
		t.Errorf("the volume is not on the node's root: %v", err)
	}
	eventually(t, ctx, "the node's capacity through GetCapacity", func() error {
		r, err := ctl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: seg})
		if err == nil && r.GetAvailableCapacity() == 0 {
			err = fmt.Errorf("none yet")
		}
		return err
	})

	// The attachments report their events through the Observer the node
	// plugin gave them (pkg/attachments' VM tests prove the calls).
	if node.cfg.Observer == nil {
		t.Fatal("the node plugin's attachments got no Observer")
	}
	node.cfg.Observer.Paused("snapshot", 3*time.Millisecond)
	node.cfg.Observer.IOError(id)
	node.cfg.Observer.Reattached(id, nil)
	// The documented metrics, with values that match what was created;
	// beside them the manager's own (the node agent's reconciles).
	for _, tt := range []struct{ addr, series string }{
		{nodeMetrics, `controller_runtime_reconcile_total{controller="ploopvolume",result="success"}`},
		{nodeMetrics, `ploop_csi_volumes{mode="node",node="node-1",type="ploop"} 1`},
		{nodeMetrics, `ploop_csi_volume_provisioned_bytes{mode="node",node="node-1",type="ploop",volume="` + id + `"} 1.6777216e+07`},
		{nodeMetrics, `ploop_csi_root_provisioned_bytes{mode="node",node="node-1"} 1.6777216e+07`},
		{nodeMetrics, `ploop_csi_root_available_bytes{mode="node",node="node-1"}`},
		{nodeMetrics, `ploop_csi_operations_total{code="OK",method="NodeGetInfo",mode="node"} 1`},
		{nodeMetrics, `ploop_csi_online_pause_seconds_bucket{mode="node",op="snapshot",le="0.005"} 1`},
		{nodeMetrics, `ploop_csi_nbd_io_errors_total{mode="node",volume="` + id + `"} 1`},
		{nodeMetrics, `ploop_csi_nbd_reattaches_total{mode="node",result="ok"} 1`},
		{ctlMetrics, `ploop_csi_operations_total{code="OK",method="CreateVolume",mode="controller"} 1`},
		{ctlMetrics, `ploop_csi_operation_duration_seconds_count{code="OK",method="CreateVolume",mode="controller"} 1`},
		{ctlMetrics, `ploop_csi_resources{kind="PloopVolume",mode="controller",node="node-1",phase="Ready"} 1`},
	} {
		_, body, err := httpGet(ctx, "http://"+tt.addr+"/metrics")
		if err != nil || !strings.Contains(body, tt.series) {
			t.Errorf("/metrics at %s (%v) lacks %s", tt.addr, err, tt.series)
		}
	}
	var lease coordinationv1.Lease
	eventually(t, ctx, "the controller's leader Lease", func() error {
		return c.Get(ctx, client.ObjectKey{Namespace: "default", Name: leaderElectionID}, &lease)
	})
	// The elected controller scans for orphans: the volume has no
	// PersistentVolume yet, but it is younger than the grace period.
	eventually(t, ctx, "the orphan scan's gauge", func() error {
		_, body, err := httpGet(ctx, "http://"+ctlMetrics+"/metrics")
		if err == nil && !strings.Contains(body, `ploop_csi_orphans{kind="volume",mode="controller"} 0`) {
			err = fmt.Errorf("no ploop_csi_orphans{kind=\"volume\"} 0 yet")
		}
		return err
	})

	if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "ploop", "volumes", id)); !os.IsNotExist(err) {
		t.Errorf("the deleted volume is still on the node's root: %v", err)
	}
}

// stagingNode stands for a node's attachments on a shared root: it
// remembers what is staged and takes online operations on it.
type stagingNode struct {
	testNode
	mu     sync.Mutex
	staged map[string]bool
	grown  map[string]int64
}

func (n *stagingNode) Stage(ctx context.Context, r driver.StageRequest) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.staged[r.VolumeID] = true
	return nil
}

func (n *stagingNode) Unstage(ctx context.Context, id, stagingPath string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.staged, id)
	return nil
}

func (n *stagingNode) Attached(ctx context.Context, id string) (bool, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.staged[id], nil
}

func (n *stagingNode) Grow(ctx context.Context, id string, size int64) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.staged[id] {
		return driver.ErrNotAttached
	}
	n.grown[id] = size
	return nil
}

// TestClusterSharedRoot runs both halves with --storage-mode shared over
// one root: the controller owns the catalogue and makes the image, with
// no topology; the node plugin, which opened no catalogue, stages it from
// the record and says so on the volume's resource; an expansion of the
// staged volume goes to that node; the storage metrics are the
// controller's.
func TestClusterSharedRoot(t *testing.T) {
	srv, c := startAPI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	kc := writeKubeconfig(t, srv)
	root, dir := t.TempDir(), shortDir(t)
	nodeSock, ctlSock := filepath.Join(dir, "node.sock"), filepath.Join(dir, "ctl.sock")
	ctlMetrics := freeAddr(t)

	start(t, []string{"--mode", "controller", "--storage-mode", "shared", "--storage-root", root, "--nodeid", "controller-0",
		"--endpoint", "unix://" + ctlSock, "--kubeconfig", kc, "--metrics-address", ctlMetrics, "--leader-election-namespace", "default"}, nil)
	ctlConn, _ := dial(t, ctx, ctlSock)
	node := &stagingNode{staged: map[string]bool{}, grown: map[string]int64{}}
	start(t, []string{"--mode", "node", "--storage-mode", "shared", "--nodeid", "node-1", "--storage-root", root,
		"--endpoint", "unix://" + nodeSock, "--kubeconfig", kc, "--trim-interval", "0"},
		func(ctx context.Context, cfg nodeConfig) (nodeAttachments, error) {
			if cfg.Dirs != nil {
				t.Errorf("the node plugin of a shared root opened a simfs root")
			}
			return node, nil
		})
	nodeConn, _ := dial(t, ctx, nodeSock)

	ni, err := csi.NewNodeClient(nodeConn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.GetAccessibleTopology() != nil {
		t.Errorf("NodeGetInfo on a shared root: %v, %v", ni, err)
	}
	mount := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	ctl := csi.NewControllerClient(ctlConn)
	resp, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-shared", VolumeCapabilities: []*csi.VolumeCapability{mount},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	if resp.GetVolume().GetAccessibleTopology() != nil {
		t.Errorf("a volume of a shared root has topology: %v", resp.GetVolume())
	}
	if _, err := os.Stat(filepath.Join(root, "ploop", "volumes", id, "DiskDescriptor.xml")); err != nil {
		t.Errorf("the controller made no image: %v", err)
	}

	record := func(want string) func() error {
		return func() error {
			var v v1alpha1.PloopVolume
			if err := c.Get(ctx, client.ObjectKey{Name: id}, &v); err != nil {
				return err
			}
			if v.Status.AttachedNode != want {
				return fmt.Errorf("status.attachedNode %q, want %q", v.Status.AttachedNode, want)
			}
			return nil
		}
	}
	nc := csi.NewNodeClient(nodeConn)
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mount, VolumeContext: resp.GetVolume().GetVolumeContext()}); err != nil {
		t.Fatal(err)
	}
	if err := record("node-1")(); err != nil {
		t.Errorf("after NodeStageVolume: %v", err)
	}
	exp, err := ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}, VolumeCapability: mount})
	if err != nil || exp.GetCapacityBytes() != 32<<20 {
		t.Fatalf("expand a staged volume: %v, %v", exp, err)
	}
	node.mu.Lock()
	grown := node.grown[id]
	node.mu.Unlock()
	if grown != 32<<20 {
		t.Errorf("the node that staged the volume grew it to %d, want %d", grown, 32<<20)
	}
	if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("delete a staged volume: %v, want FailedPrecondition", err)
	}
	if _, err := nc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if err := record("")(); err != nil {
		t.Errorf("after NodeUnstageVolume: %v", err)
	}
	for _, series := range []string{
		`ploop_csi_volumes{mode="controller",node="controller-0",type="ploop"} 1`,
		`ploop_csi_volume_provisioned_bytes{mode="controller",node="controller-0",type="ploop",volume="` + id + `"} 3.3554432e+07`,
		`ploop_csi_resources{kind="PloopVolume",mode="controller",node="",phase="Ready"} 1`,
	} {
		_, body, err := httpGet(ctx, "http://"+ctlMetrics+"/metrics")
		if err != nil || !strings.Contains(body, series) {
			t.Errorf("/metrics lacks %s (%v)", series, err)
		}
	}
	if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "ploop", "volumes", id)); !os.IsNotExist(err) {
		t.Errorf("the deleted volume is still in the root: %v", err)
	}
	eventually(t, ctx, "the volume's resource to go", func() error {
		var v v1alpha1.PloopVolume
		if err := c.Get(ctx, client.ObjectKey{Name: id}, &v); err == nil {
			return fmt.Errorf("still there")
		}
		return nil
	})
}
