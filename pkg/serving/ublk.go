package serving

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ublk"
	"k8s.io/klog/v2"
)

// device is the kernel block device a volume is attached to: an nbd
// device (*nbd.Attachment) or a ublk one (ublkDevice).
type device interface {
	Path() string
	// Resize tells the kernel the disk's new size.
	Resize(size int64) error
	// Gone is closed when someone else removed the device.
	Gone() <-chan struct{}
	// Release stops serving and leaves the device, its I/O held, for a
	// successor process.
	Release()
	// Disconnect removes the device.
	Disconnect(ctx context.Context) error
}

// ErrResizeUnsupported says the volume's kernel device cannot change its
// size while attached: ublk before the kernel's UBLK_F_UPDATE_SIZE (Linux
// 6.16). The volume grows while it is not attached.
var ErrResizeUnsupported = errors.New("a ublk device cannot change its size while attached on this kernel (it lacks UBLK_F_UPDATE_SIZE); grow the volume while it is detached, or attach it through nbd")

// ublkDevice adapts a ublk device to device.
type ublkDevice struct{ *ublk.Device }

func (d ublkDevice) Resize(int64) error {
	return fmt.Errorf("resize %s: %w", d.Path(), ErrResizeUnsupported)
}

func (d ublkDevice) Disconnect(context.Context) error {
	err := d.Close()
	// How many requests skipped the thread hand-off: how to tell that a
	// volume's I/O took the fast way.
	klog.V(4).InfoS("serving: ublk device removed", "device", d.Path(), "placedRequests", d.Placed())
	return err
}

// UblkOptions describe how a volume is served through ublk.
type UblkOptions struct {
	// Control is the process's /dev/ublk-control; it may be shared by
	// every volume. Required.
	Control *ublk.Control
	// BackendID names the volume (the CSI volume id), as for nbd: the
	// kernel keeps its hash (UblkTag) with the device, which is how
	// ReattachUblk finds the device after a restart. Required.
	BackendID string
	// Queues and Depth shape the device (ublk.Options); zero takes
	// pkg/ublk's defaults.
	Queues, Depth int
	// Inline serves requests on the queues' threads (ublk.Options.Inline).
	Inline bool
	// OnIOError, when set, is told of every error the volume's image
	// returns to a request; it must not block.
	OnIOError func(error)
}

// UblkTag is the tag a volume's ublk device carries: a 64-bit hash of its
// backend identifier, never zero (devices of other servers carry zero).
func UblkTag(backendID string) uint64 {
	h := fnv.New64a()
	h.Write([]byte("ploop-csi\x00" + backendID))
	if t := h.Sum64(); t != 0 {
		return t
	}
	return 1
}

// FindUblk returns the ublk device carrying the tag of backendID; ok is
// false when there is none.
func FindUblk(ctrl *ublk.Control, backendID string) (info ublk.DevInfo, ok bool, err error) {
	found, err := ctrl.Find(UblkTag(backendID))
	switch {
	case err != nil:
		return info, false, err
	case len(found) == 0:
		return info, false, nil
	case len(found) > 1:
		return info, false, fmt.Errorf("%d ublk devices carry the tag of %s", len(found), backendID)
	}
	return found[0], true, nil
}

func (o UblkOptions) ublkOptions() (ublk.Options, error) {
	if o.Control == nil {
		return ublk.Options{}, errors.New("attach through ublk needs /dev/ublk-control")
	}
	if o.BackendID == "" {
		return ublk.Options{}, errors.New("attach through ublk needs a backend identifier")
	}
	// 4096-byte blocks, as over nbd: a filesystem made on one transport
	// mounts on the other.
	return ublk.Options{Queues: o.Queues, Depth: o.Depth, BlockSize: 4096, Recoverable: true, Inline: o.Inline, Tag: UblkTag(o.BackendID)}, nil
}

// AttachUblk serves the volume to a new ublk device, created recoverable:
// when this process dies the kernel holds the device's I/O until a
// successor calls ReattachUblk, for as long as that takes.
func (v *Volume) AttachUblk(ctx context.Context, opts UblkOptions) error {
	return v.attachUblk(ctx, opts, false)
}

// ReattachUblk takes over the ublk device that a killed (or released)
// predecessor attached with the same BackendID (START/END_USER_RECOVERY):
// requests the predecessor had taken are handed to this process again.
// Open the volume with OpenOptions.Repair first when the predecessor was
// killed. It returns an error wrapping ErrNoDevice when no device carries
// the backend identifier's tag.
func (v *Volume) ReattachUblk(ctx context.Context, opts UblkOptions) error {
	return v.attachUblk(ctx, opts, true)
}

func (v *Volume) attachUblk(ctx context.Context, opts UblkOptions, re bool) error {
	verb := attachVerb(re)
	uo, err := opts.ublkOptions()
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, v.path, err)
	}
	done, err := v.beginAttach(verb)
	if err != nil {
		return err
	}
	defer done()
	var backend ublk.Backend = v.disk
	if opts.OnIOError != nil {
		rb := reportingBackend{Backend: v.disk, report: opts.OnIOError}
		backend = rb
		if m, ok := v.disk.(ublk.FileMapper); ok {
			backend = reportingMapper{rb, m}
		}
	}
	start := time.Now()
	var d *ublk.Device
	if re {
		info, ok, ferr := FindUblk(opts.Control, opts.BackendID)
		switch {
		case ferr != nil:
			return fmt.Errorf("reattach %s: %w", v.path, ferr)
		case !ok:
			return fmt.Errorf("reattach %s (backend %s): %w", v.path, opts.BackendID, ErrNoDevice)
		}
		d, err = ublk.Recover(ctx, opts.Control, info.ID, backend, uo)
	} else {
		d, err = ublk.Create(opts.Control, backend, uo)
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, v.path, err)
	}
	v.mu.Lock()
	v.att = ublkDevice{d}
	v.mu.Unlock()
	klog.InfoS("serving: "+verb+"ed volume through ublk", "path", v.path, "device", d.Path(), "backend", opts.BackendID, "took", time.Since(start))
	return nil
}

// reportingBackend tells report of every error the backend returns.
type reportingBackend struct {
	ublk.Backend
	report func(error)
}

// reportingMapper keeps the disk's mapped I/O: a mapped request that fails
// is done again through ReadAt or WriteAt, which report.
type reportingMapper struct {
	reportingBackend
	ublk.FileMapper
}

func (b reportingBackend) check(err error) error {
	if err != nil {
		b.report(err)
	}
	return err
}

func (b reportingBackend) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.Backend.ReadAt(p, off)
	return n, b.check(err)
}

func (b reportingBackend) WriteAt(p []byte, off int64) (int, error) {
	n, err := b.Backend.WriteAt(p, off)
	return n, b.check(err)
}

func (b reportingBackend) Flush() error { return b.check(b.Backend.Flush()) }

func (b reportingBackend) Discard(off, length int64) error {
	return b.check(b.Backend.Discard(off, length))
}

func (b reportingBackend) WriteZeroes(off, length int64, noHole bool) error {
	return b.check(b.Backend.WriteZeroes(off, length, noHole))
}
