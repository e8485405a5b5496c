package attachments

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/keylock"
	"github.com/ploop-csi/ploop-csi/pkg/mounts"
	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
	"k8s.io/klog/v2"
)

// Kind is the type of a volume.
type Kind string

// The volume kinds.
const (
	// Ploop volumes are stack directories served to a kernel nbd device.
	Ploop Kind = "ploop"
	// Simfs volumes are directories of a simfs root, limited by project
	// quota; nothing is attached or mounted to stage them.
	Simfs Kind = "simfs"
)

// Filesystems a ploop volume may carry.
const (
	FSExt4 = mounts.Ext4
	FSXFS  = mounts.XFS
)

// Defaults.
const (
	// DefaultTrimInterval is how often the driver's flag trims staged
	// filesystems unless told otherwise.
	DefaultTrimInterval = time.Hour
	// DefaultMinFreeBytes and DefaultMinFreePercent: the storage root is
	// nearly full when its free space is below both.
	DefaultMinFreeBytes   = int64(1) << 30
	DefaultMinFreePercent = 2.0
	// defaultDeadConnTimeout is pkg/nbd's default, which recovery must beat.
	defaultDeadConnTimeout = 120 * time.Second
)

// Dirs is what the Manager uses of the simfs root that holds directory
// volumes; a *simfs.Root satisfies it.
type Dirs interface {
	VolumePath(id string) (string, error)
	Usage(id string) (simfs.Usage, error)
	QuotaEnforced() error
}

var _ Dirs = (*simfs.Root)(nil)

// AttachOptions tune how ploop volumes are connected to kernel devices;
// zero values take pkg/nbd's and pkg/ublk's defaults. Timeouts are whole
// seconds.
type AttachOptions struct {
	// Transport is the node's default: nbd (""), ublk or auto. A volume
	// may ask for one of them (StageRequest.Transport).
	Transport Transport
	// UblkQueues is the number of queues of a ublk device, each served
	// by a thread of its own; 0 is one per CPU.
	UblkQueues int
	// Connections is the number of sockets per device.
	Connections int
	// Timeout is the kernel's per-request timeout.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds a device's I/O while
	// no process serves it: the longest a node plugin restart may take.
	DeadConnTimeout time.Duration
}

// Options configure a Manager.
type Options struct {
	// StorageRoot holds every volume: the stack and simfs directories
	// named in requests must lie below it. Required; absolute and clean.
	StorageRoot string
	// NodeID names this node; it places the default state directory.
	NodeID string
	// StateDir records what this node has staged. Default
	// <StorageRoot>/nodes/<NodeID>, which survives the node plugin's pod
	// and, on shared storage, stays with the node's name.
	StateDir string
	// PathPrefixes, when set, are the only directories under which
	// staging and target paths are accepted (the kubelet's directory).
	// Staging and target paths are never accepted inside the storage root
	// or the state directory.
	PathPrefixes []string
	// Attach tunes the kernel devices of ploop volumes.
	Attach AttachOptions
	// Direct opens images with O_DIRECT, so that data is not cached both
	// above and below the nbd device.
	Direct bool
	// TrimInterval is how often staged ploop filesystems are trimmed
	// (FITRIM) so that freed blocks return to the storage root; 0 turns
	// the periodic trim off. See DefaultTrimInterval.
	TrimInterval time.Duration
	// MinFreeBytes and MinFreePercent set when the storage root counts as
	// nearly full (free space below both); zero takes the defaults.
	MinFreeBytes   int64
	MinFreePercent float64
	// RecoveryTimeout bounds the re-attach of each volume at start; it
	// must end well within DeadConnTimeout. Default: a third of it.
	RecoveryTimeout time.Duration
	// Dirs is the simfs root of directory volumes; nil refuses them.
	Dirs Dirs
	// Logger receives the Manager's log; the zero value logs to klog.
	Logger klog.Logger
	// Observer, when set, is told what the volumes go through (metrics).
	Observer Observer

	// afterTrimPass, set by tests, runs after each periodic trim pass.
	afterTrimPass func()
	// exportFailed, set by tests, stands in for serving.Volume.Failed: a
	// real export fails only on a panic in its request path.
	exportFailed func(*serving.Volume) error
}

// Observer is told of what the node's volumes go through. Its methods
// must not block: IOError runs in the request path.
type Observer interface {
	// IOError: a volume's image failed a request of its nbd device.
	IOError(volumeID string)
	// Reattached: a volume attached before a restart was served again
	// (err nil) or could not be.
	Reattached(volumeID string, err error)
	// Paused: an online operation (snapshot, snapshot-delete, grow,
	// compact) paused the volume's I/O for d.
	Paused(op string, d time.Duration)
}

// Manager owns the attachments of one node: the ploop volumes it serves
// to kernel nbd devices, their filesystems and publishes, and the simfs
// volumes it has staged. One process holds the Manager of a node (the
// state directory is locked). Its methods are safe for concurrent use;
// operations on one volume are serialised, operations on different
// volumes run in parallel and never affect each other.
type Manager struct {
	opts    Options
	log     klog.Logger
	mounter *mounts.Mounter
	state   *stateDir
	locks   keylock.Locks

	kmu    sync.Mutex
	kernel *nbd.Kernel // opened on first use: hosts without nbd serve simfs
	// ublk is /dev/ublk-control when this kernel's ublk passed the
	// self-test, else nil and ublkWhy says why.
	ublk      *ublk.Control
	ublkWhy   string
	transport Transport // the node's default, resolved
	// srv serves every ploop volume of the node, one export each (named
	// by the volume id): a panic in one volume's request path fails that
	// export alone (serving.Volume.Failed), never the others or the
	// process.
	srv *nbd.Server

	mu     sync.Mutex
	vols   map[string]*volume
	closed bool

	stopTrim context.CancelFunc
	wg       sync.WaitGroup
}

// volume is the Manager's view of one staged volume. Entries are never
// changed in place: an operation holding the volume's lock builds a new
// entry and swaps it in under mu, so readers need only mu.
type volume struct {
	rec record
	// served is the open, attached stack of a ploop volume; nil when this
	// process does not serve it (not attached yet, or recovery failed).
	served *serving.Volume
	// problem says why the volume is unusable, for its condition; "" when
	// nothing is known to be wrong.
	problem string
}

// New opens the node's state and recovers it before returning: every
// ploop volume recorded as attached is repaired, reopened and served again
// to its kernel device (found by /sys/block/nbd*/backend), whose I/O the
// kernel held meanwhile; a volume staged before a reboot is attached and
// mounted again. A volume that cannot be recovered (its image gone or
// damaged) is kept with a problem that its condition reports; nothing
// else is touched. Call New before answering any request.
func New(ctx context.Context, opts Options) (*Manager, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	st, err := openStateDir(opts.StateDir)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		opts:    opts,
		log:     opts.Logger.WithName("attachments"),
		mounter: mounts.New(opts.Logger.WithName("mounts")),
		state:   st,
		srv:     nbd.New(nbd.ServerOptions{}),
		vols:    map[string]*volume{},
	}
	start := time.Now()
	if err := m.openUblk(); err != nil {
		st.close()
		return nil, err
	}
	if err := m.recover(ctx); err != nil {
		m.closeKernel()
		st.close()
		return nil, err
	}
	m.log.Info("recovered node state", "stateDir", opts.StateDir, "volumes", len(m.vols), "took", time.Since(start))
	if opts.TrimInterval > 0 {
		tctx, cancel := context.WithCancel(context.Background())
		m.stopTrim = cancel
		m.wg.Add(1)
		go m.trimLoop(tctx)
	}
	return m, nil
}

func (o *Options) setDefaults() error {
	if err := checkAbs("storage root", o.StorageRoot); err != nil {
		return err
	}
	if st, err := os.Stat(o.StorageRoot); err != nil || !st.IsDir() {
		return fmt.Errorf("storage root %s is not a directory (%v): %w", o.StorageRoot, err, ErrInvalid)
	}
	if o.StateDir == "" {
		if err := ValidateVolumeID(o.NodeID); err != nil {
			return fmt.Errorf("node id %q cannot name a state directory: %w", o.NodeID, ErrInvalid)
		}
		o.StateDir = filepath.Join(o.StorageRoot, "nodes", o.NodeID)
	}
	if err := checkAbs("state directory", o.StateDir); err != nil {
		return err
	}
	for _, p := range o.PathPrefixes {
		if err := checkAbs("path prefix", p); err != nil {
			return err
		}
	}
	a := o.Attach
	if _, err := ParseTransport(string(a.Transport), true); err != nil {
		return err
	}
	if a.UblkQueues < 0 || a.UblkQueues > 64 {
		return fmt.Errorf("%d ublk queues: want 0 to 64: %w", a.UblkQueues, ErrInvalid)
	}
	if a.Connections < 0 || a.Timeout < 0 || a.DeadConnTimeout < 0 || a.Timeout%time.Second != 0 || a.DeadConnTimeout%time.Second != 0 {
		return fmt.Errorf("attach options %+v: need non-negative whole seconds: %w", a, ErrInvalid)
	}
	if o.TrimInterval < 0 {
		return fmt.Errorf("trim interval %v is negative: %w", o.TrimInterval, ErrInvalid)
	}
	if o.MinFreeBytes == 0 {
		o.MinFreeBytes = DefaultMinFreeBytes
	}
	if o.MinFreePercent == 0 {
		o.MinFreePercent = DefaultMinFreePercent
	}
	if o.RecoveryTimeout <= 0 {
		dct := o.Attach.DeadConnTimeout
		if dct == 0 {
			dct = defaultDeadConnTimeout
		}
		o.RecoveryTimeout = dct / 3
	}
	if o.Logger.GetSink() == nil {
		o.Logger = klog.Background()
	}
	return nil
}

// Close stops the Manager for a shutdown or a restart: the periodic trim
// stops and every served volume is released — the kernel keeps its
// device, filesystem mounted, and holds its I/O for DeadConnTimeout until
// the next Manager takes over. Nothing is detached or unmounted.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	ids := make([]string, 0, len(m.vols))
	for id := range m.vols {
		ids = append(ids, id)
	}
	m.mu.Unlock()
	if m.stopTrim != nil {
		m.stopTrim()
	}
	m.wg.Wait()
	var errs []error
	for _, id := range ids {
		// Wait for a running operation on the volume; a new one fails
		// on closed. Release only stops serving.
		unlock, err := m.lockVolume(context.Background(), id)
		if err != nil {
			continue
		}
		if v := m.get(id); v != nil && v.served != nil {
			errs = append(errs, v.served.Release())
		}
		unlock()
	}
	m.closeKernel()
	errs = append(errs, m.state.close())
	m.log.Info("closed: volumes stay attached for the next node plugin", "volumes", len(ids))
	return errors.Join(errs...)
}

// lockVolume serialises the operations on volume id; waiting ends with
// ctx, so a stuck operation makes later ones fail with ErrBusy instead of
// piling up.
func (m *Manager) lockVolume(ctx context.Context, id string) (func(), error) {
	unlock, err := m.locks.Lock(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w (%v)", id, ErrBusy, err)
	}
	return unlock, nil
}

// begin locks volume id for an operation, failing once the Manager is
// closed.
func (m *Manager) begin(ctx context.Context, id string) (func(), error) {
	if err := m.checkOpen(); err != nil {
		return nil, err
	}
	unlock, err := m.lockVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := m.checkOpen(); err != nil {
		unlock()
		return nil, err
	}
	return unlock, nil
}

func (m *Manager) checkOpen() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return fmt.Errorf("attachments: %w", os.ErrClosed)
	}
	return nil
}

// get returns the entry of volume id, nil when it is not staged here.
func (m *Manager) get(id string) *volume {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vols[id]
}

// set replaces the entry of a volume; nil removes it. Called with the
// volume's lock held.
func (m *Manager) set(id string, v *volume) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if v == nil {
		delete(m.vols, id)
		return
	}
	m.vols[id] = v
}

// save records rec and then makes it the entry's record, keeping the
// entry's served volume and problem.
func (m *Manager) save(old *volume, rec record) (*volume, error) {
	if err := m.state.write(rec); err != nil {
		return old, err
	}
	v := &volume{rec: rec}
	if old != nil {
		v.served, v.problem = old.served, old.problem
	}
	m.set(rec.VolumeID, v)
	return v, nil
}

// kernelConn returns the process's netlink connection to the nbd driver,
// opening it on first use.
func (m *Manager) kernelConn() (*nbd.Kernel, error) {
	m.kmu.Lock()
	defer m.kmu.Unlock()
	if m.kernel == nil {
		k, err := nbd.OpenKernel()
		if err != nil {
			return nil, err
		}
		m.kernel = k
	}
	return m.kernel, nil
}

func (m *Manager) closeKernel() {
	m.kmu.Lock()
	defer m.kmu.Unlock()
	if m.kernel != nil {
		m.kernel.Close()
		m.kernel = nil
	}
	if m.ublk != nil {
		m.ublk.Close()
		m.ublk = nil
	}
}

// attachOptions are the serving options of volume id. The backend
// identifier is the volume id: it is how recovery finds the device. Every
// volume is an export of the Manager's one server.
func (m *Manager) attachOptions(id string) serving.AttachOptions {
	a := m.opts.Attach
	o := serving.AttachOptions{
		BackendID:       id,
		Connections:     a.Connections,
		Timeout:         a.Timeout,
		DeadConnTimeout: a.DeadConnTimeout,
		Server:          m.srv,
	}
	if obs := m.opts.Observer; obs != nil {
		o.OnIOError = func(error) { obs.IOError(id) }
	}
	return o
}

// exportFailed says why the export of a served volume failed, nil when it
// serves.
func (m *Manager) exportFailed(v *serving.Volume) error {
	if m.opts.exportFailed != nil {
		return m.opts.exportFailed(v)
	}
	return v.Failed()
}

// serve opens the stack of rec and serves it to a kernel device: the
// device that already has the volume's backend identifier (a predecessor
// was killed or released it), or a fresh one. This is the one place where
// a volume gets its server and device. The stack is repaired first: a
// killed predecessor left it marked in use.
func (m *Manager) serve(ctx context.Context, rec record) (*serving.Volume, error) {
	v, err := serving.Open(rec.Path, serving.OpenOptions{Direct: m.opts.Direct, Repair: true})
	if errors.Is(err, unix.EWOULDBLOCK) {
		// The stack directory's lock: nothing to repair.
		return nil, fmt.Errorf("%w (on a shared storage root, another node serves it until it unstages it): %v", ErrServedElsewhere, err)
	}
	if err != nil {
		return nil, fmt.Errorf("the image could not be opened; if it needs repair, unstage the volume and run `ploopctl check --repair %s`: %v: %w", rec.Path, err, ErrUnavailable)
	}
	if v.Kind() != serving.KindStack {
		v.Close(ctx)
		return nil, fmt.Errorf("%s is not a ploop stack directory: %w", rec.Path, ErrUnavailable)
	}
	if rec.Transport == TransportUblk {
		if err := m.serveUblk(ctx, v, rec.VolumeID); err != nil {
			v.Close(context.Background())
			return nil, err
		}
		return v, nil
	}
	k, err := m.kernelConn()
	if err != nil {
		v.Close(ctx)
		return nil, err
	}
	opts := m.attachOptions(rec.VolumeID)
	_, ferr := nbd.FindBackend(rec.VolumeID)
	if ferr == nil {
		rctx, cancel := context.WithTimeout(ctx, m.opts.RecoveryTimeout)
		err = v.Reattach(rctx, k, opts)
		cancel()
		if obs := m.opts.Observer; obs != nil && !errors.Is(err, serving.ErrNoDevice) {
			obs.Reattached(rec.VolumeID, err)
		}
		if errors.Is(err, serving.ErrNoDevice) {
			// Disconnected in between.
			err = v.Attach(ctx, k, opts)
		}
	} else {
		err = v.Attach(ctx, k, opts)
	}
	if err != nil {
		v.Close(context.Background())
		return nil, err
	}
	return v, nil
}

// MaxVolumes is how many ploop volumes the node can attach through its
// default transport: the number of nbd devices (/sys/block/nbd*, or the
// nbd module's nbds_max when that is larger; 0 when the nbd driver is not
// loaded), or ublk's ublks_max.
func (m *Manager) MaxVolumes() int {
	if m.transport == TransportUblk {
		return ublkMax()
	}
	devs, _ := filepath.Glob("/sys/block/nbd*")
	n := len(devs)
	if b, err := os.ReadFile("/sys/module/nbd/parameters/nbds_max"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && v > n {
			n = v
		}
	}
	return n
}
