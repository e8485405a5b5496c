// Command ploop-csi is the CSI driver of ploop-csi: ploop thin volumes
// served through the kernel's nbd driver, and simfs directory volumes with
// project quota, from a storage root on the node.
//
//	ploop-csi --endpoint unix:///csi/csi.sock --nodeid NODE --storage-root DIR
//
// --mode all (the default) runs the identity, controller and node services
// in one process over a local storage root: a single node, the demo and the
// tests. --mode controller and --mode node are the halves of a cluster
// deployment (cluster.go): both run on a controller-runtime manager (the
// CSI server is one of its runnables; optional /metrics, /healthz and
// /readyz); the controller creates volumes on the nodes through
// PloopVolume and PloopSnapshot resources, which the node plugins' agents
// carry out on their own storage roots.
//
// Start-up order: the storage root's simfs root (one for the process,
// shared by the attachments and the catalogue); the node's attachments,
// whose restart recovery re-serves the volumes attached before a restart
// (the kernel holds their I/O meanwhile); then the catalogue; then the
// socket. SIGTERM or SIGINT
// stops answering calls (those in flight get --shutdown-timeout), closes
// the attachments without detaching anything, and removes the socket.
//
// Exit status: 0 after a clean shutdown or --version/--help, 1 when the
// driver cannot start or fails, 2 for a usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/ploop-csi/ploop-csi/pkg/attachments"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
	"github.com/ploop-csi/ploop-csi/pkg/orphans"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, stop, os.Args[1:], os.Stdout, os.Stderr, newAttachments)
	stop()
	klog.Flush()
	os.Exit(code)
}

// The values of --storage-mode.
const (
	storageLocal  = "local"
	storageShared = "shared"
)

// options are the parsed flags.
type options struct {
	endpoint        string
	nodeID          string
	mode            string
	storageRoot     string
	storageMode     string
	driverName      string
	kubeletDir      string
	overcommit      float64
	trimInterval    time.Duration
	tidyInterval    time.Duration
	nbdConnections  int
	nbdTimeout      time.Duration
	deadConnTimeout time.Duration
	directIO        bool
	attach          string
	ublkQueues      int
	shutdownTimeout time.Duration
	version         bool

	// --mode controller and node: the API server and the manager.
	kubeconfig              string
	metricsAddress          string
	healthAddress           string
	leaderElect             bool
	leaderElectionNamespace string
	deleteOrphans           bool
	orphanInterval          time.Duration
	orphanGrace             time.Duration
	registrationDir         string
	kubeletRegistrationPath string
}

func flags(o *options, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("ploop-csi", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.endpoint, "endpoint", "unix:///csi/csi.sock",
		"CSI endpoint: a unix socket (made 0600); no network port is ever opened")
	fs.StringVar(&o.nodeID, "nodeid", "", "this node's name, as the CO knows it (required): the topology segment "+driver.TopologyKey+" of its volumes")
	fs.StringVar(&o.mode, "mode", string(driver.ModeAll), "services to run: all (identity, controller and node in one process over a local storage root, "+
		"no Kubernetes), controller (a cluster's controller: volumes are created on the nodes through PloopVolume/PloopSnapshot resources) "+
		"or node (a cluster's node plugin: node services, and the node agent that carries out those resources on this node's storage root)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "controller and node modes: the API server's kubeconfig; empty uses the pod's service account")
	fs.StringVar(&o.metricsAddress, "metrics-address", "0", "controller and node modes: where Prometheus /metrics is served (e.g. :8080); 0, the default, opens no port")
	fs.StringVar(&o.healthAddress, "health-address", "0", "controller and node modes: where /healthz and /readyz are served (e.g. :9808); 0, the default, opens no port")
	fs.BoolVar(&o.leaderElect, "leader-elect", true, "controller mode: elect one active controller among replicas (a Lease)")
	fs.StringVar(&o.leaderElectionNamespace, "leader-election-namespace", "", "controller mode: the Lease's namespace; empty takes the pod's")
	fs.BoolVar(&o.deleteOrphans, "delete-orphans", false, "controller mode: delete PloopVolumes (and so their images) that no PersistentVolume uses; "+
		"off, orphans are only reported (Events, the ploop_csi_orphans metric)")
	fs.DurationVar(&o.orphanInterval, "orphan-scan-interval", orphans.DefaultInterval, "controller mode: how often orphans are looked for")
	fs.DurationVar(&o.orphanGrace, "orphan-grace", orphans.DefaultGrace, "controller mode: how old a volume must be before a missing PersistentVolume makes it an orphan")
	fs.StringVar(&o.storageRoot, "storage-root", "/var/lib/ploop-csi", "storage root: an existing directory (not a symlink) that holds every volume and snapshot")
	fs.StringVar(&o.storageMode, "storage-mode", storageLocal, "controller and node modes: local (each node's root is its own; volumes have the node's topology) "+
		"or shared (the root is one filesystem mounted at the same path on every node, such as NFS or CephFS: the controller owns its catalogue "+
		"and needs the root mounted too; volumes have no topology; ploop only)")
	fs.StringVar(&o.registrationDir, "registration-dir", "", "node mode: register with the kubelet through this directory (the kubelet's plugins_registry, "+
		"as mounted here) instead of a node-driver-registrar sidecar; empty: off")
	fs.StringVar(&o.kubeletRegistrationPath, "kubelet-registration-path", "", "node mode with --registration-dir: the CSI socket's path as the kubelet sees it "+
		"(e.g. /var/lib/kubelet/plugins/csi.ploop.io/csi.sock)")
	fs.StringVar(&o.driverName, "drivername", driver.DefaultName, "the driver's name (the CSIDriver object's)")
	fs.StringVar(&o.kubeletDir, "kubelet-dir", "", "when set (e.g. /var/lib/kubelet), staging and target paths must lie below it; "+
		"empty accepts any absolute path outside the storage root")
	fs.Float64Var(&o.overcommit, "overcommit-ratio", 1.0, "thin provisioning: promise up to the root's size × this ratio (and never more than its free space × ratio) "+
		"to volumes; 1.0 means no overcommit")
	fs.DurationVar(&o.trimInterval, "trim-interval", time.Hour, "how often staged ploop filesystems are trimmed, so that freed space returns to the storage root; 0 turns it off")
	fs.DurationVar(&o.tidyInterval, "tidy-interval", driver.DefaultTidyInterval, "how often merges left pending in ploop chains are retried (also once at start); 0 turns the periodic run off")
	fs.IntVar(&o.nbdConnections, "nbd-connections", 0, "sockets per nbd device; 0 takes pkg/nbd's default (1: with one socket and no timeout the kernel never resends a slow request)")
	fs.DurationVar(&o.nbdTimeout, "nbd-timeout", 0, "the kernel's per-request nbd timeout, whole seconds; 0 takes pkg/nbd's default")
	fs.DurationVar(&o.deadConnTimeout, "dead-conn-timeout", 0, "how long the kernel holds a device's I/O while no process serves it "+
		"(the longest a restart of this process may take), whole seconds; 0 takes pkg/nbd's default (2m)")
	fs.StringVar(&o.attach, "attach", string(attachments.TransportNBD), "how ploop volumes reach the kernel by default: nbd; ublk (Linux 6.0+ with ublk_drv, several times faster; "+
		"an attached volume then grows only once unstaged, until kernels with UBLK_F_UPDATE_SIZE); or auto (ublk when the kernel passes a self-test at start, else nbd). "+
		"A StorageClass may ask for either with the parameter attach")
	fs.IntVar(&o.ublkQueues, "ublk-queues", 0, "queues (each a thread) per ublk device; 0 is one per CPU")
	fs.BoolVar(&o.directIO, "direct-io", true, "read and write ploop images with O_DIRECT, so that a volume's data is cached once (by its nbd device), "+
		"not twice; turn it off only for a storage root on a filesystem without direct I/O (tmpfs before Linux 6.6)")
	fs.DurationVar(&o.shutdownTimeout, "shutdown-timeout", driver.DefaultShutdownTimeout, "on SIGTERM, how long calls in flight may take before they are cut off")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	klog.InitFlags(fs) // --v and the other klog flags
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: ploop-csi --nodeid NODE [--storage-root DIR] [--endpoint unix:///csi/csi.sock] [flags]\n\n")
		fs.PrintDefaults()
	}
	return fs
}

// check validates the flags that New and Open do not.
func (o *options) check() error {
	switch {
	case o.nodeID == "":
		return errors.New("--nodeid is required")
	case !filepath.IsAbs(o.storageRoot) || filepath.Clean(o.storageRoot) != o.storageRoot:
		return fmt.Errorf("--storage-root %q: want an absolute, clean path", o.storageRoot)
	case o.kubeletDir != "" && (!filepath.IsAbs(o.kubeletDir) || filepath.Clean(o.kubeletDir) != o.kubeletDir):
		return fmt.Errorf("--kubelet-dir %q: want an absolute, clean path", o.kubeletDir)
	case o.trimInterval < 0 || o.tidyInterval < 0 || o.shutdownTimeout <= 0:
		return errors.New("--trim-interval and --tidy-interval must not be negative, --shutdown-timeout must be positive")
	case o.storageMode != storageLocal && o.storageMode != storageShared:
		return fmt.Errorf("--storage-mode %q: want %s or %s", o.storageMode, storageLocal, storageShared)
	case o.storageMode == storageShared && o.mode == string(driver.ModeAll):
		return fmt.Errorf("--storage-mode %s needs --mode controller or node: one process over a root is mode all's own case", storageShared)
	case o.registrationDir != "" && (o.mode != string(driver.ModeNode) || o.kubeletRegistrationPath == ""):
		return errors.New("--registration-dir needs --mode node and --kubelet-registration-path")
	case o.nbdConnections < 0 || o.nbdConnections > 64:
		return fmt.Errorf("--nbd-connections %d: want 0 (the default) to 64", o.nbdConnections)
	case o.ublkQueues < 0 || o.ublkQueues > 64:
		return fmt.Errorf("--ublk-queues %d: want 0 (one per CPU) to 64", o.ublkQueues)
	}
	if t, err := attachments.ParseTransport(o.attach, true); err != nil || t == "" {
		return fmt.Errorf("--attach %q: want nbd, ublk or auto", o.attach)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"--nbd-timeout", o.nbdTimeout}, {"--dead-conn-timeout", o.deadConnTimeout}} {
		if d.v < 0 || d.v%time.Second != 0 {
			return fmt.Errorf("%s %v: want whole seconds (the kernel's unit), 0 for the default", d.name, d.v)
		}
	}
	return nil
}

// run is the whole program, with its environment as arguments so that tests
// can run it: stop is called once ctx is done (a second signal then kills
// the process the default way).
func run(ctx context.Context, stop func(), args []string, stdout, stderr io.Writer, newNode newNodeFunc) int {
	var o options
	fs := flags(&o, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "ploop-csi: unexpected arguments %q\n", fs.Args())
		return exitUsage
	}
	ver := buildVersion()
	if o.version {
		fmt.Fprintf(stdout, "ploop-csi %s\n", ver)
		return exitOK
	}
	if err := o.check(); err != nil {
		fmt.Fprintf(stderr, "ploop-csi: %v\n", err)
		return exitUsage
	}
	sock, err := parseEndpoint(o.endpoint)
	if err != nil {
		fmt.Fprintf(stderr, "ploop-csi: %v\n", err)
		return exitUsage
	}
	serveMode := serve
	switch driver.Mode(o.mode) {
	case driver.ModeAll:
	case driver.ModeController, driver.ModeNode:
		serveMode = serveCluster
	default:
		fmt.Fprintf(stderr, "ploop-csi: --mode %q: want all, controller or node\n", o.mode)
		return exitUsage
	}
	if err := serveMode(ctx, stop, o, ver, sock, newNode); err != nil {
		fmt.Fprintf(stderr, "ploop-csi: %v\n", err)
		return exitFail
	}
	return exitOK
}

// serve runs the driver in mode all until ctx is done.
func serve(ctx context.Context, stop func(), o options, ver, sock string, newNode newNodeFunc) (err error) {
	log := klog.Background().WithName("ploop-csi")
	log.Info("starting", "version", ver, "node", o.nodeID, "root", o.storageRoot, "endpoint", sock)
	dcfg := driver.Config{Name: o.driverName, Version: ver, NodeID: o.nodeID, Mode: driver.ModeAll, ShutdownTimeout: o.shutdownTimeout}
	cat, closeStorage, err := openNodeStorage(ctx, o, newNode, nil, &dcfg)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := closeStorage(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	dcfg.Catalog = cat
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
	go func() {
		<-ctx.Done()
		stop()
	}()
	if err := d.Serve(ctx, lis); err != nil {
		return err
	}
	log.Info("stopped; attached volumes stay attached for the next start")
	return nil
}

// openNodeStorage opens what a node serves, in an order that matters:
// one simfs root for the whole process, shared by the attachments and the
// catalogue (simfs.Open takes no lock, so a Root each would not serialise
// their changes to the same volumes); then the attachments, before the
// catalogue touches any stack, since their recovery re-serves attached
// volumes, which the kernel holds only for the dead-connection timeout;
// then the catalogue. It fills in dcfg's node, path prefixes and tidy
// interval. close undoes it all without detaching anything.
//
// On a shared root (--storage-mode shared) the node opens no simfs root
// (simfs needs a node's own filesystem) and no catalogue, which the
// controller owns: it reads the volumes' records through a catalog.View.
func openNodeStorage(ctx context.Context, o options, newNode newNodeFunc, obs attachments.Observer, dcfg *driver.Config) (driver.Catalog, func() error, error) {
	var closers []func() error
	closeAll := func() error {
		var errs []error
		for i := len(closers) - 1; i >= 0; i-- {
			errs = append(errs, closers[i]())
		}
		return errors.Join(errs...)
	}
	shared := o.storageMode == storageShared
	var dirs *simfs.Root
	var err error
	if !shared {
		dirs, err = catalog.OpenSimfs(o.storageRoot, simfs.Options{})
	}
	switch {
	case shared:
	case errors.Is(err, catalog.ErrUnavailable) || errors.Is(err, catalog.ErrInvalid):
		return nil, nil, err // the root itself is unusable
	case err != nil:
		// ploop volumes must still be recovered and served.
		klog.Background().Error(err, "simfs volumes are refused until the simfs root can be opened")
		dirs = nil
	default:
		closers = append(closers, func() error {
			if err := dirs.Close(); err != nil {
				return fmt.Errorf("close the simfs root: %w", err)
			}
			return nil
		})
	}
	node, err := newNode(ctx, nodeConfig{
		StorageRoot: o.storageRoot, NodeID: o.nodeID, KubeletDir: o.kubeletDir, TrimInterval: o.trimInterval,
		NBDConnections: o.nbdConnections, NBDTimeout: o.nbdTimeout, DeadConnTimeout: o.deadConnTimeout, DirectIO: o.directIO,
		Attach: attachments.Transport(o.attach), UblkQueues: o.ublkQueues, Dirs: dirs,
		Observer: obs,
	})
	if err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("start the node's attachments: %w", err)
	}
	closers = append(closers, func() error {
		if err := node.Close(); err != nil {
			return fmt.Errorf("close the node's attachments: %w", err)
		}
		return nil
	})
	var cat driver.Catalog
	if shared {
		if cat, err = catalog.OpenView(o.storageRoot); err != nil {
			closeAll()
			return nil, nil, err
		}
		dcfg.SharedRoot = true
	} else {
		own, err := catalog.Open(o.storageRoot, catalog.Options{OvercommitRatio: o.overcommit, Online: driver.OnlineOf(node), SimfsRoot: dirs})
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		closers = append(closers, func() error {
			if err := own.Close(); err != nil {
				return fmt.Errorf("close the catalogue: %w", err)
			}
			return nil
		})
		cat = own
	}
	dcfg.Node = node
	if o.kubeletDir != "" {
		dcfg.PathPrefixes = []string{o.kubeletDir}
	}
	dcfg.TidyInterval = o.tidyInterval
	if dcfg.TidyInterval == 0 {
		dcfg.TidyInterval = -1 // the flag's 0 is "off"; the driver's 0 is its default
	}
	return cat, closeAll, nil
}
