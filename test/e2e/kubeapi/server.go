package kubeapi

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// Options tune a Server.
type Options struct {
	// Args are extra kube-apiserver flags (--name=value); one the harness
	// sets too replaces the harness's.
	Args []string
	// StartTimeout bounds Start after the binaries are found or built
	// (default 2 minutes: a start takes a few seconds on an idle machine,
	// several times that beside a VM test).
	StartTimeout time.Duration
	// Logf receives progress (the build, the start time); nil discards it.
	Logf func(string, ...any)
	// ServingIPs are further addresses the serving certificate covers:
	// how a forward presents the server elsewhere (a VM's guest net).
	ServingIPs []net.IP
}

// AdminUser is the identity of Config: a member of system:masters, which
// RBAC never restricts.
const AdminUser = "kubeapi-admin"

// serviceCIDR is a range that only exists as API objects: with no
// kube-proxy or kubelet on the host, nothing routes or connects to it.
const serviceCIDR = "10.0.0.0/24"

// Server is a running kube-apiserver and its etcd.
type Server struct {
	// URL is the API server's https://127.0.0.1:port.
	URL string

	dir       string
	ca        *certAuthority
	admin     *rest.Config
	etcd      *process
	apiserver *process
	mu        sync.Mutex
	others    []*process // StartComponent's, killed first by Stop
	stopping  bool       // set by Stop: StartComponent refuses
	stopOnce  sync.Once
	done      chan struct{} // closed by Stop
}

// SkipReason returns why the tests that need a server are skipped, or ""
// when they must run: only an explicit PLOOP_CSI_SKIP_KUBE=1 outside CI skips
// them, as PLOOP_CSI_SKIP_VM does for the VM tests.
func SkipReason() string {
	if os.Getenv("PLOOP_CSI_SKIP_KUBE") == "1" && os.Getenv("CI") != "true" {
		return "PLOOP_CSI_SKIP_KUBE=1: kube-apiserver tests skipped by request (never honoured when CI=true)"
	}
	return ""
}

// StartT starts a Server for t, building kube-apiserver first if the cache
// lacks it, and stops it when t ends. Anything missing fails t with the
// reason; it skips only as SkipReason says.
func StartT(t testing.TB, opts Options) *Server {
	t.Helper()
	if why := SkipReason(); why != "" {
		t.Skip(why)
	}
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	ctx := context.Background()
	// *testing.T has a deadline, *testing.B does not.
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok {
			// Leave time to report instead of being killed by go test's timeout.
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, dl.Add(-15*time.Second))
			defer cancel()
		}
	}
	s, err := Start(ctx, opts)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (the go test -timeout ran out; a cold kube-apiserver build takes minutes, and a rerun continues from the Go build cache)", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() && !s.stopped() {
			t.Logf("kubeapi: the test failed; end of kube-apiserver's log:\n%s", s.apiserver.logTail())
		}
		s.Stop()
	})
	return s
}

// Start finds or builds the binaries (bounded by ctx), then starts etcd and
// kube-apiserver and waits until the server is ready. The processes outlive
// ctx; Stop ends them.
func Start(ctx context.Context, opts Options) (*Server, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	paths, err := Binaries(ctx, logf)
	if err != nil {
		return nil, err
	}
	timeout := opts.StartTimeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	begin := time.Now()
	dir, err := os.MkdirTemp(scratchBase(), "kubeapi-")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, done: make(chan struct{})}
	if err := s.start(ctx, paths, opts.Args, opts.ServingIPs); err != nil {
		s.Stop()
		return nil, err
	}
	logf("kubeapi: kube-apiserver %s ready at %s in %s", KubernetesVersion, s.URL, time.Since(begin).Round(time.Millisecond))
	return s, nil
}

// scratchDir, when set (by tests), replaces scratchBase's choice.
var scratchDir string

// scratchBase is where the server's state goes: tmpfs when there is one,
// because etcd syncs every write and a disk shared with VM tests makes each
// sync slow; the data is thrown away at Stop anyway.
func scratchBase() string {
	if scratchDir != "" {
		return scratchDir
	}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if f, err := os.CreateTemp("/dev/shm", ".kubeapi-probe-"); err == nil {
			f.Close()
			os.Remove(f.Name())
			return "/dev/shm"
		}
	}
	return os.TempDir()
}

func (s *Server) start(ctx context.Context, paths Paths, extra []string, servingIPs []net.IP) error {
	var err error
	if s.ca, err = newCA(); err != nil {
		return fmt.Errorf("create CA: %w", err)
	}
	serviceIP := net.IPv4(10, 0, 0, 1) // the first address of serviceCIDR: the kubernetes Service's
	servingCert, servingKey, err := s.ca.servingCert(append([]net.IP{serviceIP}, servingIPs...)...)
	if err != nil {
		return fmt.Errorf("create serving certificate: %w", err)
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	saKeyPEM, err := ecKeyPEM(saKey)
	if err != nil {
		return err
	}
	adminCert, adminKey, err := s.ca.clientCert(AdminUser, []string{"system:masters"})
	if err != nil {
		return fmt.Errorf("create admin certificate: %w", err)
	}
	// The server's identity towards kubelets (logs, exec, a node's
	// metrics): a member of system:masters, which a kubelet's webhook
	// authorisation allows everything.
	kubeletCert, kubeletKey, err := s.ca.clientCert("kube-apiserver-kubelet-client", []string{"system:masters"})
	if err != nil {
		return fmt.Errorf("create kubelet client certificate: %w", err)
	}
	files := map[string][]byte{
		"ca.crt":             s.ca.certPEM,
		"serving.crt":        servingCert,
		"serving.key":        servingKey,
		"sa.key":             saKeyPEM,
		"kubelet-client.crt": kubeletCert,
		"kubelet-client.key": kubeletKey,
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(s.dir, name), data, 0o600); err != nil {
			return err
		}
	}

	etcdURL, err := s.startEtcd(ctx, paths.Etcd)
	if err != nil {
		return err
	}

	// A port picked free can be taken before the server binds it; a start
	// that fails for that reason is retried on another.
	for attempt := 1; ; attempt++ {
		port, err := FreePort()
		if err != nil {
			return err
		}
		s.URL = "https://127.0.0.1:" + strconv.Itoa(port)
		s.admin = s.restConfig(adminCert, adminKey)
		args := []string{
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			// The server refuses a loopback address in the kubernetes
			// Service's Endpoints, so its reconciler would only log that
			// every few seconds; a test that needs in-cluster access to the
			// server passes another advertise address and reconciler in Args.
			"--endpoint-reconciler-type=none",
			"--secure-port=" + strconv.Itoa(port),
			"--cert-dir=" + s.dir,
			"--tls-cert-file=" + filepath.Join(s.dir, "serving.crt"),
			"--tls-private-key-file=" + filepath.Join(s.dir, "serving.key"),
			"--client-ca-file=" + filepath.Join(s.dir, "ca.crt"),
			"--etcd-servers=" + etcdURL,
			"--service-cluster-ip-range=" + serviceCIDR,
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + filepath.Join(s.dir, "sa.key"),
			"--service-account-signing-key-file=" + filepath.Join(s.dir, "sa.key"),
			"--authorization-mode=RBAC",
			"--kubelet-client-certificate=" + filepath.Join(s.dir, "kubelet-client.crt"),
			"--kubelet-client-key=" + filepath.Join(s.dir, "kubelet-client.key"),
			"--allow-privileged=true",
			"--profiling=false",
		}
		s.apiserver, err = startProcess("kube-apiserver", filepath.Join(s.dir, "kube-apiserver.log"),
			paths.KubeAPIServer, overrideFlags(args, extra)...)
		if err != nil {
			return err
		}
		err = s.waitReady(ctx)
		if err == nil {
			return nil
		}
		if attempt < 3 && s.apiserver.bindConflict() {
			s.apiserver.kill()
			continue
		}
		return err
	}
}

// overrideFlags is base without the flags extra sets, then extra: some of
// kube-apiserver's flags refuse to be given twice.
func overrideFlags(base, extra []string) []string {
	name := func(a string) string { n, _, _ := strings.Cut(a, "="); return n }
	var out []string
	for _, b := range base {
		if !slices.ContainsFunc(extra, func(e string) bool { return name(e) == name(b) }) {
			out = append(out, b)
		}
	}
	return append(out, extra...)
}

// startEtcd runs a single-member etcd whose client and peer URLs are on
// loopback (etcd's defaults would name localhost, which may resolve beyond
// 127.0.0.1, and fixed ports, which another etcd may hold).
func (s *Server) startEtcd(ctx context.Context, bin string) (string, error) {
	for attempt := 1; ; attempt++ {
		client, err := FreePort()
		if err != nil {
			return "", err
		}
		peer, err := FreePort()
		if err != nil {
			return "", err
		}
		clientURL := "http://127.0.0.1:" + strconv.Itoa(client)
		peerURL := "http://127.0.0.1:" + strconv.Itoa(peer)
		s.etcd, err = startProcess("etcd", filepath.Join(s.dir, "etcd.log"), bin,
			"--name=kubeapi",
			"--data-dir="+filepath.Join(s.dir, "etcd"),
			"--listen-client-urls="+clientURL,
			"--advertise-client-urls="+clientURL,
			"--listen-peer-urls="+peerURL,
			"--initial-advertise-peer-urls="+peerURL,
			"--initial-cluster=kubeapi="+peerURL,
			"--initial-cluster-state=new",
			"--logger=zap",
			"--log-outputs=stderr",
		)
		if err != nil {
			return "", err
		}
		err = s.etcd.poll(ctx, func(ctx context.Context) bool {
			return httpOK(ctx, http.DefaultClient, clientURL+"/health")
		})
		if err == nil {
			return clientURL, nil
		}
		if attempt < 3 && s.etcd.bindConflict() {
			s.etcd.kill()
			// The member's URLs are recorded in its data dir.
			os.RemoveAll(filepath.Join(s.dir, "etcd"))
			continue
		}
		return "", err
	}
}

// waitReady waits for /readyz and for the default namespace, which the
// server's own bootstrap controller creates shortly after it can serve:
// tests of namespaced objects need it there.
func (s *Server) waitReady(ctx context.Context) error {
	hc, err := rest.HTTPClientFor(s.admin)
	if err != nil {
		return err
	}
	defer hc.CloseIdleConnections()
	return s.apiserver.poll(ctx, func(ctx context.Context) bool {
		return httpOK(ctx, hc, s.URL+"/readyz") && httpOK(ctx, hc, s.URL+"/api/v1/namespaces/default")
	})
}

// httpOK reports whether a GET of url answers 200 within a second.
func httpOK(ctx context.Context, hc *http.Client, url string) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false
	}
	resp, err := hc.Do(req)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func (s *Server) restConfig(certPEM, keyPEM []byte) *rest.Config {
	return &rest.Config{
		Host: s.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   s.ca.certPEM,
			CertData: certPEM,
			KeyData:  keyPEM,
		},
		// client-go's default of 5 requests a second would make tests that
		// create many objects wait on the client, not the server.
		QPS:   200,
		Burst: 400,
	}
}

// Config is a client configuration for AdminUser (group system:masters).
func (s *Server) Config() *rest.Config { return rest.CopyConfig(s.admin) }

// ConfigFor is a client configuration that authenticates as user in groups
// (plus system:authenticated, which the server adds), by a client
// certificate from the server's CA: RBAC sees exactly that identity, as it
// would a kubeconfig's.
func (s *Server) ConfigFor(user string, groups ...string) (*rest.Config, error) {
	cert, key, err := s.ca.clientCert(user, groups)
	if err != nil {
		return nil, err
	}
	return s.restConfig(cert, key), nil
}

// Stop kills kube-apiserver and etcd and removes their state. It is safe to
// call more than once.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		// Nothing is kept, so there is nothing to shut down gracefully for.
		s.mu.Lock()
		others := s.others
		s.stopping = true
		s.mu.Unlock()
		for _, p := range others {
			p.kill()
		}
		if s.apiserver != nil {
			s.apiserver.kill()
		}
		if s.etcd != nil {
			s.etcd.kill()
		}
		os.RemoveAll(s.dir)
		close(s.done)
	})
}

func (s *Server) stopped() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Component is a further process of the control plane (a controller
// manager, a scheduler) that StartComponent started.
type Component struct{ p *process }

// LogTail is the end of the component's log.
func (c *Component) LogTail() string { return c.p.logTail() }

// Exited reports whether the component has exited, and its Wait error.
func (c *Component) Exited() (bool, error) {
	select {
	case <-c.p.done:
		return true, c.p.err
	default:
		return false, nil
	}
}

// StartComponent runs bin with args beside the server, its output in a log
// of the server's directory; Stop kills it before the server.
func (s *Server) StartComponent(name, bin string, args ...string) (*Component, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return nil, fmt.Errorf("start %s: the server is stopped", name)
	}
	p, err := startProcess(name, filepath.Join(s.dir, name+".log"), bin, args...)
	if err != nil {
		return nil, err
	}
	s.others = append(s.others, p)
	return &Component{p: p}, nil
}

// APIServerLogTail is the end of kube-apiserver's log.
func (s *Server) APIServerLogTail() string { return s.apiserver.logTail() }

// FreePort is a loopback TCP port nothing listened on a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// process is a child whose output goes to a log file, so a failure can show
// its end without the test log carrying every line of a healthy start.
type process struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // the Wait result, once done is closed
}

func startProcess(name, logPath, bin string, args ...string) (*process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = childEnv()
	// The children must not outlive a test binary killed by its timeout.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// childEnv drops ETCD_* variables, which etcd reads as flags and which a
// developer's shell may set for some other etcd.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD_") {
			env = append(env, kv)
		}
	}
	return env
}

// poll calls ready every 100 ms until it is true, the process exits or ctx
// ends; the error of the latter two carries the end of the process's log.
func (p *process) poll(ctx context.Context, ready func(context.Context) bool) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if ready(ctx) {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before it was ready (%v); end of its log:\n%s", p.name, p.err, p.logTail())
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w; end of its log:\n%s", p.name, ctx.Err(), p.logTail())
		case <-tick.C:
		}
	}
}

// bindConflict reports whether the process exited because its port was
// taken after freePort chose it.
func (p *process) bindConflict() bool {
	select {
	case <-p.done:
	default:
		return false
	}
	b, _ := os.ReadFile(p.log)
	return strings.Contains(string(b), "address already in use")
}

func (p *process) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Kill()
	<-p.done
}

func (p *process) logTail() string {
	if p == nil {
		return ""
	}
	b, err := os.ReadFile(p.log)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	if len(b) == 0 {
		return "(empty)"
	}
	return tail(b, 6000)
}
