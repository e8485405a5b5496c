package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ploop-csi/ploop-csi/test/e2e/gomod"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// Options configure a Cluster. The zero value is the default.
type Options struct {
	// NodeName is the node's name; default DefaultNodeName.
	NodeName string
	// Images are further OCI archives the node imports (the driver's).
	Images []string
	// MemoryMiB is the node VM's memory; default 4096.
	MemoryMiB int
	// Lifetime bounds the node VM; default 40 minutes (under a loaded CI
	// machine the flows took 39).
	Lifetime time.Duration
	// ReadyTimeout bounds the wait for the node to be Ready; default 5
	// minutes.
	ReadyTimeout time.Duration
}

// DefaultNodeName is the node's name when Options has none.
const DefaultNodeName = "e2e-node"

// Cluster is a running control plane on the host and a node in a VM.
type Cluster struct {
	API      *kubeapi.Server
	Clients  *kubernetes.Clientset
	NodeName string

	xchg       string
	components map[string]*kubeapi.Component
	console    *syncBuffer
	vmDone     chan vmResult
	proxy      *kubeletProxy
	stopOnce   sync.Once
	phases     []string
}

type vmResult struct {
	res vmtest.Result
	err error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Start brings the cluster up for t and tears it down when t ends: the
// control plane (building the release's binaries into the cache when it
// lacks them), then the node VM, and returns once the node is Ready. A
// failure, then or later in t, logs the control plane's, the kubelet's
// and containerd's logs and the guest console.
func Start(t *testing.T, o Options) *Cluster {
	t.Helper()
	if why := vmtest.SkipReason(); why != "" {
		t.Skip(why)
	}
	if o.NodeName == "" {
		o.NodeName = DefaultNodeName
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 4096
	}
	if o.Lifetime == 0 {
		o.Lifetime = 40 * time.Minute
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 5 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	c := &Cluster{NodeName: o.NodeName, xchg: t.TempDir(), components: map[string]*kubeapi.Component{},
		console: &syncBuffer{}, vmDone: make(chan vmResult, 1)}
	phase := c.phaseTimer(t)

	bins := map[string]string{}
	for _, cmd := range []string{"kube-controller-manager", "kube-scheduler", "kubelet"} {
		p, err := kubeapi.Binary(ctx, cmd, t.Logf)
		if err != nil {
			t.Fatal(err)
		}
		bins[cmd] = p
	}
	snapctl, err := SnapshotController.Binary(ctx, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	bins[SnapshotController.Name] = snapctl
	crds, err := gomod.Dir(ctx, snapshotCRDModule)
	if err != nil {
		t.Fatal(err)
	}
	phase("binaries")
	kubeletFwd, err := kubeapi.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	proxyDir := t.TempDir()
	if c.proxy, err = startKubeletProxy(filepath.Join(proxyDir, "kubelet-proxy.sock"), kubeletFwd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.proxy.Close() })
	egress := filepath.Join(proxyDir, "egress.yaml")
	if err := os.WriteFile(egress, []byte(egressConfig(filepath.Join(proxyDir, "kubelet-proxy.sock"))), 0o600); err != nil {
		t.Fatal(err)
	}
	c.API = kubeapi.StartT(t, kubeapi.Options{
		// The kubelet's identity (system:node:NAME) is authorised by the
		// Node authorizer, as in a real cluster.
		// It reaches a kubelet by the node's InternalIP (the guest's),
		// which the egress proxy relays; by default it would try the
		// node's name first, which no resolver knows.
		Args: []string{"--authorization-mode=Node,RBAC", "--egress-selector-config-file=" + egress,
			"--kubelet-preferred-address-types=InternalIP"},
		ServingIPs: []net.IP{net.ParseIP(APIIP)},
	})
	t.Cleanup(func() {
		c.Stop(t) // first: the guest copies the pods' logs out as it stops
		if r := c.proxy.Refused(); len(r) > 0 {
			t.Errorf("cluster: the API server tried to reach addresses other than the node's kubelet: %v", r)
		}
		if t.Failed() {
			t.Logf("cluster: the test failed; logs follow\n%s", c.Logs())
		}
	})
	if c.Clients, err = kubernetes.NewForConfig(c.API.Config()); err != nil {
		t.Fatal(err)
	}
	if err := c.API.InstallCRDs(ctx, filepath.Join(crds, "config", "crd", "snapshot.storage.k8s.io_*.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := c.startControllers(bins); err != nil {
		t.Fatal(err)
	}
	phase("control plane")
	if err := c.writeNodeFiles(o); err != nil {
		t.Fatal(err)
	}
	phase("node files and images")
	apiPort, err := portOf(c.API.URL)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		res, err := vmtest.Exec(context.Background(), vmtest.Options{
			MemoryMiB: o.MemoryMiB, Timeout: o.Lifetime,
			Network: &vmtest.Network{GuestFwd: []vmtest.GuestFwd{{GuestAddr: APIAddr, HostPort: apiPort}},
				HostFwd: []vmtest.HostFwd{{HostPort: kubeletFwd, GuestPort: KubeletPort}}},
			Env: []string{"PATH=" + filepath.Dir(bins["kubelet"]) + ":/usr/sbin:/usr/bin:/sbin:/bin"},
		}, vmtest.Command{Args: []string{"sh", filepath.Join(c.xchg, nodeScript)}, ExchangeDir: c.xchg, Output: c.console, Logf: t.Logf})
		c.vmDone <- vmResult{res, err}
	}()
	rctx, rcancel := context.WithTimeout(context.Background(), o.ReadyTimeout)
	defer rcancel()
	if err := c.waitNodeReady(rctx); err != nil {
		t.Fatal(err)
	}
	phase("node Ready")
	return c
}

// phaseTimer returns a function that logs how long each phase of Start
// took, for the CI log.
func (c *Cluster) phaseTimer(t *testing.T) func(string) {
	last := time.Now()
	return func(name string) {
		d := time.Since(last).Round(100 * time.Millisecond)
		last = time.Now()
		c.phases = append(c.phases, fmt.Sprintf("%s %s", name, d))
		t.Logf("cluster: %s in %s", name, d)
	}
}

// Phases lists the start's phases with their times.
func (c *Cluster) Phases() []string { return c.phases }

// startControllers runs kube-controller-manager (which runs the
// DaemonSet, Deployment and node-lifecycle controllers, and publishes
// kube-root-ca.crt), kube-scheduler and the snapshot-controller against
// the server as its admin.
func (c *Cluster) startControllers(bins map[string]string) error {
	kc := filepath.Join(c.API.Dir(), "admin.kubeconfig")
	if err := c.API.WriteKubeconfig(kc); err != nil {
		return err
	}
	for name, args := range map[string][]string{
		"kube-controller-manager": {"--kubeconfig=" + kc, "--leader-elect=false", "--secure-port=0",
			"--root-ca-file=" + filepath.Join(c.API.Dir(), "ca.crt"),
			"--service-account-private-key-file=" + filepath.Join(c.API.Dir(), "sa.key"),
			"--use-service-account-credentials=false"},
		"kube-scheduler":        {"--kubeconfig=" + kc, "--leader-elect=false", "--secure-port=0"},
		SnapshotController.Name: {"--kubeconfig=" + kc, "--leader-election=false", "--v=2"},
	} {
		comp, err := c.API.StartComponent(name, bins[name], args...)
		if err != nil {
			return err
		}
		c.components[name] = comp
	}
	return nil
}

// writeNodeFiles puts what the guest needs into the exchange directory.
func (c *Cluster) writeNodeFiles(o Options) error {
	x := c.xchg
	for _, d := range []string{cniDir, imagesDir, modulesDir} {
		if err := os.MkdirAll(filepath.Join(x, d), 0o755); err != nil {
			return err
		}
	}
	files := map[string]string{
		nodeScript:                               guestScript(x, o.NodeName),
		containerdConfig:                         containerdTOML(x),
		kubeletConfig:                            kubeletYAML(x),
		caFile:                                   string(c.API.CACertPEM()),
		filepath.Join(cniDir, "10-e2e.conflist"): cniConflist,
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(x, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	if err := c.API.WriteKubeconfigFor(filepath.Join(x, kubeletKubecfg), "https://"+APIAddr,
		"system:node:"+o.NodeName, "system:nodes"); err != nil {
		return err
	}
	if err := buildToolsImage(filepath.Join(x, imagesDir, "tools.tar")); err != nil {
		return err
	}
	for i, img := range o.Images {
		if err := copyFile(img, filepath.Join(x, imagesDir, fmt.Sprintf("image-%d.tar", i))); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(from, to string) error {
	if err := os.Link(from, to); err == nil {
		return nil
	}
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func portOf(u string) (int, error) {
	pu, err := url.Parse(u)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(pu.Port())
}

// waitNodeReady waits until the node reports Ready, the VM ends or ctx
// ends.
func (c *Cluster) waitNodeReady(ctx context.Context) error {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	last := "not registered"
	for {
		n, err := c.Clients.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
		if err == nil {
			last = "registered, not Ready"
			for _, cond := range n.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					if cond.Status == corev1.ConditionTrue {
						return nil
					}
					last = fmt.Sprintf("Ready=%s: %s", cond.Status, cond.Message)
				}
			}
		}
		select {
		case r := <-c.vmDone:
			c.vmDone <- r
			return fmt.Errorf("the node VM ended before node %s was Ready (exit %d, %v)", c.NodeName, r.res.ExitStatus, r.err)
		case <-ctx.Done():
			return fmt.Errorf("node %s not Ready: %w (%s)", c.NodeName, ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// Stop ends the node VM (the guest's script returns when the stop file
// appears; the VM then powers off) and waits for it; the control plane
// stops with the server. Safe to call more than once.
func (c *Cluster) Stop(t *testing.T) {
	c.stopOnce.Do(func() {
		if err := os.WriteFile(filepath.Join(c.xchg, stopFile), nil, 0o644); err != nil {
			t.Errorf("cluster: stop the node: %v", err)
		}
		select {
		case r := <-c.vmDone:
			c.vmDone <- r
			if r.err != nil {
				t.Errorf("cluster: the node VM: %v", r.err)
			} else if r.res.ExitStatus != 0 {
				t.Errorf("cluster: the node's script exited %d; guest console:\n%s", r.res.ExitStatus, tail(c.console.String(), 4000))
			}
		case <-time.After(2 * time.Minute):
			t.Errorf("cluster: the node VM did not stop within 2 minutes")
		}
	})
}

// Logs are the ends of every log of the cluster, for a failure report.
func (c *Cluster) Logs() string {
	var b strings.Builder
	section := func(name, text string) { fmt.Fprintf(&b, "===== %s =====\n%s\n", name, tail(text, 4000)) }
	section("kube-apiserver", c.API.APIServerLogTail())
	for name, comp := range c.components {
		section(name, comp.LogTail())
	}
	for _, f := range []string{kubeletLog, containerdLog} {
		data, err := os.ReadFile(filepath.Join(c.xchg, f))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			data = []byte(err.Error())
		}
		section(f+" (guest)", string(data))
	}
	filepath.WalkDir(filepath.Join(c.xchg, podLogsDir), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			data, _ := os.ReadFile(p)
			section("pod log "+strings.TrimPrefix(p, c.xchg+"/"+podLogsDir+"/"), string(data))
		}
		return nil
	})
	section("guest console", c.console.String())
	return b.String()
}

// ModulesDir is a directory of the node that stands for its kernel
// modules directory: the guest's modules come from its initramfs, loaded
// before the node starts.
func (c *Cluster) ModulesDir() string { return filepath.Join(c.xchg, modulesDir) }

// ExchangeDir is the directory the node VM shares with the host.
func (c *Cluster) ExchangeDir() string { return c.xchg }

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return "...\n" + s
}
