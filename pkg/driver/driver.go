package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// Defaults.
const (
	// DefaultName is the driver's name (the CSIDriver object's).
	DefaultName = "csi.ploop.io"
	// TopologyKey is the topology segment that pins a volume to the node
	// whose storage root holds it.
	TopologyKey = "topology.csi.ploop.io/node"
	// DefaultTidyInterval is how often the catalogue's pending merges are
	// retried (catalog.Tidy).
	DefaultTidyInterval = time.Hour
	// DefaultShutdownTimeout bounds how long Serve waits for calls in
	// flight when its context ends before it cuts them off.
	DefaultShutdownTimeout = 30 * time.Second
)

// Mode selects the CSI services a process runs.
type Mode string

const (
	// ModeAll runs identity, controller and node in one process over a
	// local storage root: a single node, the demo, the tests.
	ModeAll Mode = "all"
	// ModeController runs identity and controller over a Cluster: the
	// volumes live on the nodes' roots and are reached through custom
	// resources (DESIGN.md §3).
	ModeController Mode = "controller"
	// ModeNode runs identity and node over the node's own catalogue and
	// attachments; the controller reaches its catalogue through the node
	// agent (package nodeagent), not through this driver.
	ModeNode Mode = "node"
)

// Catalog is what the driver uses of the storage root's catalogue; a
// *catalog.Catalog is one. In a cluster (issue 12) the controller reaches
// the owning node's catalogue through custom resources behind the same
// methods.
type Catalog interface {
	Root() string
	CreateVolume(ctx context.Context, req catalog.VolumeRequest) (catalog.Volume, error)
	GetVolume(ctx context.Context, id string) (catalog.Volume, error)
	DeleteVolume(ctx context.Context, id string) error
	ExpandVolume(ctx context.Context, id string, required, limit int64) (int64, bool, error)
	ListVolumes(ctx context.Context, token string, max int) ([]catalog.Volume, string, error)
	CreateSnapshot(ctx context.Context, name, sourceVolume string) (catalog.Snapshot, error)
	GetSnapshot(ctx context.Context, id string) (catalog.Snapshot, error)
	DeleteSnapshot(ctx context.Context, id string) error
	ListSnapshots(ctx context.Context, f catalog.SnapshotFilter, token string, max int) ([]catalog.Snapshot, string, error)
	Capacity(ctx context.Context, typ catalog.Type) (catalog.Capacity, error)
	Health(ctx context.Context) error
	Condition(ctx context.Context, id string) (catalog.Condition, error)
	VolumePath(id string) (string, error)
	Tidy(ctx context.Context) error
}

var (
	_ Catalog = (*catalog.Catalog)(nil)
	_ Catalog = (*catalog.View)(nil) // a node's, on a shared root
)

// Cluster is the Catalog of ModeController: volumes live on many nodes'
// roots, so creation and capacity name the node (its topology segment).
// Volumes and snapshots it returns carry their Node.
type Cluster interface {
	Catalog
	CreateVolumeOn(ctx context.Context, node string, req catalog.VolumeRequest) (catalog.Volume, error)
	CapacityOn(ctx context.Context, node string, typ catalog.Type) (catalog.Capacity, error)
}

// Config configures a Driver.
type Config struct {
	// Name is the driver's name; default DefaultName.
	Name string
	// Version is the build's version, reported by GetPluginInfo.
	Version string
	// NodeID names this node: its topology segment and NodeGetInfo.
	NodeID string
	// Mode is ModeAll (the default), ModeController or ModeNode.
	Mode Mode
	// Catalog is the storage root's catalogue; in ModeController over
	// node-local roots, a Cluster. Required.
	Catalog Catalog
	// SharedRoot says the storage root is one filesystem mounted at the
	// same path on every node: volumes have no topology, any node can
	// stage any ploop volume, and the controller's Catalog is the root's
	// own catalogue (its online operations reach the node that has a
	// volume attached). simfs volumes, which need the project quota of a
	// node's own filesystem, are refused.
	SharedRoot bool
	// Node is this node's attachments. Required in ModeAll and ModeNode. Its online
	// operations must also be the catalogue's (catalog.Options.Online =
	// OnlineOf(Node)).
	Node Node
	// PathPrefixes, when set, are the only directories below which
	// staging and target paths are accepted (the kubelet's directory).
	PathPrefixes []string
	// TidyInterval is how often Serve runs catalog.Tidy after its first
	// run at start; default DefaultTidyInterval, negative turns it off.
	TidyInterval time.Duration
	// ShutdownTimeout: default DefaultShutdownTimeout.
	ShutdownTimeout time.Duration
	// Observer, when set, is told of every answered call (metrics).
	Observer Observer
	// Logger receives one line per call (V(2), errors at V(1) or as
	// errors) and the driver's own messages; the zero value logs to klog.
	Logger klog.Logger
}

// Observer is told of every CSI call the driver answered: its method's
// short name, the gRPC code and how long it took.
type Observer interface {
	ObserveCall(method string, code codes.Code, d time.Duration)
}

// Driver is the CSI driver: it translates CSI calls into calls on the
// catalogue and the node's attachments. See the package documentation.
type Driver struct {
	cfg Config
	log klog.Logger
}

// nameRE is the plugin name rule of the CSI spec: domain-name notation, at
// most 63 characters, alphanumeric at both ends.
var nameRE = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,61}[a-zA-Z0-9])?$`)

// New checks cfg and returns a Driver.
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if !nameRE.MatchString(cfg.Name) {
		return nil, fmt.Errorf("driver name %q: want domain-name notation, at most 63 characters", cfg.Name)
	}
	if cfg.Version == "" {
		return nil, errors.New("the driver needs a version")
	}
	switch cfg.Mode {
	case "":
		cfg.Mode = ModeAll
	case ModeAll, ModeNode:
	case ModeController:
		if _, ok := cfg.Catalog.(Cluster); !ok && !cfg.SharedRoot {
			return nil, fmt.Errorf("mode %s needs a catalogue that spans the nodes (driver.Cluster), not %T", cfg.Mode, cfg.Catalog)
		}
	default:
		return nil, fmt.Errorf("mode %q: want %s, %s or %s", cfg.Mode, ModeAll, ModeController, ModeNode)
	}
	// The node id goes into topology segments, whose values Kubernetes
	// limits to label values (63 characters) in spirit; it must at least
	// be a sane string.
	if cfg.NodeID == "" || len(cfg.NodeID) > 128 || !printable(cfg.NodeID) {
		return nil, fmt.Errorf("node id %q: want 1 to 128 printable ASCII characters", cfg.NodeID)
	}
	if cfg.Catalog == nil {
		return nil, errors.New("the driver needs the storage root's catalogue")
	}
	if cfg.Node == nil && cfg.Mode != ModeController {
		return nil, fmt.Errorf("the driver needs the node's attachments in mode %s", cfg.Mode)
	}
	for _, p := range cfg.PathPrefixes {
		if err := pathShape("path prefix", p); err != nil {
			return nil, err
		}
	}
	if cfg.TidyInterval == 0 {
		cfg.TidyInterval = DefaultTidyInterval
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = DefaultShutdownTimeout
	}
	log := cfg.Logger
	if log.GetSink() == nil {
		log = klog.Background()
	}
	return &Driver{cfg: cfg, log: log.WithName("driver")}, nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// Server returns a gRPC server with the driver's services and its
// interceptor registered, for Serve or a test.
func (d *Driver) Server() *grpc.Server {
	srv := grpc.NewServer(grpc.UnaryInterceptor(d.intercept))
	csi.RegisterIdentityServer(srv, &identityServer{d: d})
	if d.cfg.Mode != ModeNode {
		csi.RegisterControllerServer(srv, &controllerServer{d: d})
	}
	if d.cfg.Mode != ModeController {
		csi.RegisterNodeServer(srv, &nodeServer{d: d})
	}
	return srv
}

// Serve answers CSI calls on lis until ctx ends, then stops: calls in
// flight get ShutdownTimeout to finish before they are cut off. It runs
// catalog.Tidy once at start and every TidyInterval meanwhile. Serve does
// not close the catalogue or the node; their owner does, after Serve
// returned (the node without detaching anything).
func (d *Driver) Serve(ctx context.Context, lis net.Listener) error {
	srv := d.Server()
	tidyCtx, stopTidy := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		d.tidyLoop(tidyCtx)
	}()
	defer func() {
		stopTidy()
		wg.Wait()
	}()

	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	d.log.Info("serving CSI", "name", d.cfg.Name, "version", d.cfg.Version, "node", d.cfg.NodeID,
		"mode", d.cfg.Mode, "root", d.cfg.Catalog.Root(), "endpoint", lis.Addr().String())
	select {
	case err := <-served:
		return fmt.Errorf("serve CSI on %s: %w", lis.Addr(), err)
	case <-ctx.Done():
	}
	d.log.Info("stopping: waiting for calls in flight", "timeout", d.cfg.ShutdownTimeout)
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	timer := time.NewTimer(d.cfg.ShutdownTimeout)
	defer timer.Stop()
	select {
	case <-stopped:
	case <-timer.C:
		d.log.Info("calls still in flight after the shutdown timeout; cutting them off")
		srv.Stop()
		<-stopped
	}
	<-served
	return nil
}

// tidyLoop runs the catalogue's pending merges now and then.
func (d *Driver) tidyLoop(ctx context.Context) {
	tidy := func() {
		if err := d.cfg.Catalog.Tidy(ctx); err != nil && ctx.Err() == nil {
			d.log.Error(err, "tidying the storage root's chains failed; retrying at the next interval", "interval", d.cfg.TidyInterval)
		}
	}
	if d.cfg.Mode == ModeController && !d.cfg.SharedRoot {
		return // each node tidies its own root
	}
	if d.cfg.Mode == ModeNode && d.cfg.SharedRoot {
		return // the controller owns the shared root's catalogue
	}
	tidy()
	if d.cfg.TidyInterval < 0 {
		return
	}
	t := time.NewTicker(d.cfg.TidyInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			tidy()
		}
	}
}
