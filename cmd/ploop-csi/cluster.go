package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/clustercatalog"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
	"github.com/ploop-csi/ploop-csi/pkg/kubeletplugin"
	"github.com/ploop-csi/ploop-csi/pkg/metrics"
	"github.com/ploop-csi/ploop-csi/pkg/nodeagent"
	"github.com/ploop-csi/ploop-csi/pkg/orphans"
)

// leaderElectionID names the Lease the controller replicas compete for.
const leaderElectionID = "controller.csi.ploop.io"

// scrapeTimeout bounds how long a /metrics scrape reads the catalogue or
// the API server.
const scrapeTimeout = 20 * time.Second

// restConfig is the API server's address and credentials: --kubeconfig,
// else the pod's service account.
func restConfig(o options) (*rest.Config, error) {
	if o.kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig %s: %w", o.kubeconfig, err)
		}
		return cfg, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("--mode %s talks to the API server: run in a pod or pass --kubeconfig: %w", o.mode, err)
	}
	return cfg, nil
}

func scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, v1alpha1.AddToScheme} {
		if err := add(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// csiServer runs the driver's gRPC server as one of the manager's
// runnables, on every replica: the CSI sidecars beside each replica talk
// to it, and they elect their own leader.
type csiServer struct {
	d       *driver.Driver
	lis     net.Listener
	serving atomic.Bool
	started chan struct{} // closed as serving begins
}

func (s *csiServer) Start(ctx context.Context) error {
	s.serving.Store(true)
	close(s.started)
	defer s.serving.Store(false)
	return s.d.Serve(ctx, s.lis)
}

func (s *csiServer) NeedLeaderElection() bool { return false }

// ready is the readiness check: the CSI socket is served. A node plugin
// builds its attachments, whose restart recovery re-serves the volumes
// attached before, before the manager starts anything.
func (s *csiServer) ready(*http.Request) error {
	if !s.serving.Load() {
		return errors.New("the CSI server is not serving yet")
	}
	return nil
}

// serveCluster runs --mode controller or --mode node on a controller-runtime
// manager until ctx is done.
func serveCluster(ctx context.Context, stop func(), o options, ver, sock string, newNode newNodeFunc) (err error) {
	log := klog.Background().WithName("ploop-csi")
	ctrl.SetLogger(klog.Background())
	log.Info("starting", "version", ver, "mode", o.mode, "node", o.nodeID, "endpoint", sock)
	cfg, err := restConfig(o)
	if err != nil {
		return err
	}
	sch, err := scheme()
	if err != nil {
		return err
	}
	mopts := ctrl.Options{
		Scheme:                 sch,
		Metrics:                metricsserver.Options{BindAddress: o.metricsAddress},
		HealthProbeBindAddress: o.healthAddress,
		Logger:                 klog.Background(),
		// The default (30 s) would cut off CSI calls in flight, which get
		// --shutdown-timeout of their own.
		GracefulShutdownTimeout: ptrDuration(o.shutdownTimeout + o.shutdownTimeout/2),
	}
	// The manager serves controller-runtime's registry; the mode label
	// keeps a controller and a node plugin in one process (tests) apart.
	reg := prometheus.WrapRegistererWith(prometheus.Labels{"mode": o.mode}, ctrlmetrics.Registry)
	dcfg := driver.Config{Name: o.driverName, Version: ver, NodeID: o.nodeID, ShutdownTimeout: o.shutdownTimeout}
	var setup func(ctrl.Manager) error
	// storage is the catalogue this process owns, if any, for the
	// storage metrics: a node's own, or the controller's of a shared root.
	var storage *catalog.Catalog
	closeShared := func() error { return nil }
	// deleteVolume is how --delete-orphans deletes on a shared root.
	var deleteVolume func(context.Context, string) error
	defer func() {
		if cerr := closeShared(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close the catalogue: %w", cerr))
		}
	}()
	switch driver.Mode(o.mode) {
	case driver.ModeController:
		mopts.LeaderElection = o.leaderElect
		mopts.LeaderElectionID = leaderElectionID
		mopts.LeaderElectionNamespace = o.leaderElectionNamespace
		if mopts.LeaderElectionNamespace == "" {
			mopts.LeaderElectionNamespace = inClusterNamespace()
		}
		mopts.LeaderElectionReleaseOnCancel = true
		dcfg.Mode = driver.ModeController
		setup = func(mgr ctrl.Manager) error {
			copts := clustercatalog.Options{Reader: mgr.GetAPIReader()}
			if o.storageMode != storageShared {
				dcfg.Catalog = clustercatalog.New(mgr.GetClient(), copts)
				return nil
			}
			cat, err := openSharedCatalog(ctx, o, catalog.Options{OvercommitRatio: o.overcommit,
				Online: clustercatalog.NewSharedOnline(mgr.GetClient(), copts)})
			if err != nil {
				return err
			}
			closeShared = cat.Close
			shared := clustercatalog.NewShared(cat, mgr.GetClient(), copts)
			dcfg.Catalog, dcfg.SharedRoot, deleteVolume = shared, true, shared.DeleteVolume
			dcfg.TidyInterval = o.tidyInterval
			if dcfg.TidyInterval == 0 {
				dcfg.TidyInterval = -1
			}
			storage = cat
			return nil
		}
	case driver.ModeNode:
		mopts.Cache = nodeagent.CacheOptions(o.nodeID)
		if o.storageMode == storageShared {
			mopts.Cache = nodeagent.SharedCacheOptions(o.nodeID)
		}
		nodeMetrics, err := metrics.NewNode(reg)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		defer nodeMetrics.Unregister(reg)
		cat, closeNode, err := openNodeStorage(ctx, o, newNode, nodeMetrics, &dcfg)
		if err != nil {
			return err
		}
		defer func() {
			if cerr := closeNode(); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}()
		dcfg.Mode, dcfg.Catalog = driver.ModeNode, cat
		own, local := cat.(*catalog.Catalog)
		if local {
			storage = own
		}
		setup = func(mgr ctrl.Manager) error {
			rec := mgr.GetEventRecorderFor("ploop-csi-node")
			if local {
				return nodeagent.Setup(mgr, nodeagent.Options{NodeName: o.nodeID, Catalog: own, Recorder: rec})
			}
			rep, err := nodeagent.SetupShared(mgr, nodeagent.SharedOptions{NodeName: o.nodeID, Online: driver.OnlineOf(dcfg.Node), Recorder: rec})
			if err != nil {
				return err
			}
			dcfg.Node = reportingNode{Node: dcfg.Node, rep: rep}
			return nil
		}
	default:
		return fmt.Errorf("--mode %q has no manager", o.mode)
	}
	mgr, err := ctrl.NewManager(cfg, mopts)
	if err != nil {
		return fmt.Errorf("start the manager: %w", err)
	}
	if err := setup(mgr); err != nil {
		return err
	}
	csiMetrics, err := metrics.NewCSI(reg)
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	defer csiMetrics.Unregister(reg)
	dcfg.Observer = csiMetrics
	if dcfg.Mode == driver.ModeController {
		rep, err := orphans.New(orphans.Options{
			Driver: dcfg.Name, Reader: mgr.GetAPIReader(), Writer: mgr.GetClient(),
			Recorder: mgr.GetEventRecorderFor("ploop-csi-controller"), Registerer: reg,
			Interval: o.orphanInterval, Grace: o.orphanGrace, Delete: o.deleteOrphans, DeleteVolume: deleteVolume,
			Logger: klog.Background().WithName("orphans"),
		})
		if err != nil {
			return err
		}
		defer rep.Unregister()
		if err := mgr.Add(rep); err != nil {
			return err
		}
	}
	var collectors []prometheus.Collector
	if dcfg.Mode == driver.ModeController {
		collectors = append(collectors, metrics.NewResources(mgr.GetAPIReader(), scrapeTimeout))
	}
	if storage != nil {
		collectors = append(collectors, metrics.NewStorage(o.nodeID, storage, scrapeTimeout))
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		defer reg.Unregister(c)
	}
	d, err := driver.New(dcfg)
	if err != nil {
		return err
	}
	lis, closeLis, err := listenUnix(sock)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := closeLis(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	srv := &csiServer{d: d, lis: lis, started: make(chan struct{})}
	if err := mgr.Add(srv); err != nil {
		return err
	}
	if o.registrationDir != "" {
		reg, err := kubeletplugin.New(o.driverName, o.kubeletRegistrationPath, klog.Background().WithName("registration"))
		if err != nil {
			return err
		}
		if err := mgr.Add(&registrationServer{reg: reg, path: kubeletplugin.SocketPath(o.registrationDir, o.driverName), csi: srv.started}); err != nil {
			return err
		}
		// Ready once the kubelet knows the driver: until then it can
		// stage nothing here.
		if err := mgr.AddReadyzCheck("kubelet-registration", func(*http.Request) error { return reg.Registered() }); err != nil {
			return err
		}
	}
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("csi", srv.ready); err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		stop()
	}()
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("manager: %w", err)
	}
	log.Info("stopped; attached volumes stay attached for the next start")
	return nil
}

// inClusterNamespace is the pod's namespace, for the leader election
// Lease; "" outside a pod.
func inClusterNamespace() string {
	b, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
	if err != nil {
		return ""
	}
	return string(b)
}

func ptrDuration(d time.Duration) *time.Duration { return &d }

// registrationServer serves the kubelet's registration socket once the CSI
// socket is served: the kubelet calls NodeGetInfo as soon as it has read
// the registration, and does not retry a failure until the registration
// socket is made again.
type registrationServer struct {
	reg  *kubeletplugin.Registration
	path string
	csi  <-chan struct{}
}

func (r *registrationServer) Start(ctx context.Context) error {
	select {
	case <-r.csi:
	case <-ctx.Done():
		return nil
	}
	lis, closeLis, err := listenUnix(r.path)
	if err != nil {
		return fmt.Errorf("kubelet registration: %w", err)
	}
	defer closeLis()
	return r.reg.Serve(ctx, lis)
}

func (r *registrationServer) NeedLeaderElection() bool { return false }

// openSharedCatalog opens the catalogue of a shared root for the
// controller. Another process may still hold it for a while (the previous
// controller pod stopping, or a lock the shared filesystem has not yet
// released for a node that died): Open is retried until ctx ends.
func openSharedCatalog(ctx context.Context, o options, copts catalog.Options) (*catalog.Catalog, error) {
	log := klog.Background().WithName("ploop-csi")
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for logged := false; ; logged = true {
		cat, err := catalog.Open(o.storageRoot, copts)
		if !errors.Is(err, catalog.ErrHeld) {
			return cat, err
		}
		if !logged {
			log.Info("waiting for the shared storage root's catalogue, which another process holds", "root", o.storageRoot, "reason", err.Error())
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("open the shared storage root %s: %w (%w)", o.storageRoot, ctx.Err(), err)
		case <-t.C:
		}
	}
}

// reportingNode is the node's attachments on a shared root: a volume it
// stages or unstages is recorded on its PloopVolume, which is how the
// controller finds the node to send the volume's online operations to.
// The record follows the fact, and a failure to write it fails the call,
// which the CO retries.
type reportingNode struct {
	driver.Node
	rep *nodeagent.Reporter
}

func (n reportingNode) Stage(ctx context.Context, r driver.StageRequest) error {
	if err := n.Node.Stage(ctx, r); err != nil {
		return err
	}
	return n.rep.Served(ctx, r.VolumeID)
}

func (n reportingNode) Unstage(ctx context.Context, id, stagingPath string) error {
	if err := n.Node.Unstage(ctx, id, stagingPath); err != nil {
		return err
	}
	return n.rep.Released(ctx, id)
}
