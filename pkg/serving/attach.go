package serving

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"k8s.io/klog/v2"
)

// ErrNoDevice says Reattach found no kernel device with the volume's
// backend identifier: the device was disconnected (or the node rebooted),
// so the volume needs a fresh Attach.
var ErrNoDevice = errors.New("no connected nbd device has this backend identifier")

// AttachOptions describe how a volume is connected to a kernel nbd device.
type AttachOptions struct {
	// BackendID names the volume (the CSI volume id). The kernel shows it
	// in /sys/block/nbdN/backend, which is how Reattach finds the device
	// after a restart, so it must be unique on the node. Required; at most
	// 255 bytes, no NUL or newline.
	BackendID string
	// Device asks for a particular device, "/dev/nbdN". Empty takes any
	// free device. Reattach only checks that the volume's device is this one.
	Device string
	// Connections is the number of sockets the kernel spreads requests
	// over; 0 takes pkg/nbd's default.
	Connections int
	// Timeout is the kernel's per-request timeout; 0 takes pkg/nbd's
	// default. The kernel keeps the value of the first Attach; Reattach
	// does not change it.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds I/O while every
	// connection is dead, waiting for Reattach; 0 takes pkg/nbd's default.
	// It bounds how long a restart of the serving process may take.
	DeadConnTimeout time.Duration
	// Server, when set, serves the volume as one export among others:
	// one server for every volume of a process (the node plugin). The
	// export is added at attach and removed when the volume lets go of
	// its device. Nil gives the volume a server of its own.
	Server *nbd.Server
	// OnIOError, when set, is told of every error the volume's image
	// returns to a request (nbd.Export.OnIOError); it must not block.
	OnIOError func(error)
}

// nbdOptions translates to pkg/nbd's options; the volume's export is named
// by its backend identifier, unique per volume, so that a shared server
// can tell the volumes apart.
func (o AttachOptions) nbdOptions() (nbd.AttachOptions, error) {
	n := nbd.AttachOptions{
		BackendID:       o.BackendID,
		Export:          o.BackendID,
		Connections:     o.Connections,
		Index:           nbd.AnyDevice,
		Timeout:         o.Timeout,
		DeadConnTimeout: o.DeadConnTimeout,
	}
	// Checked here, before FindBackend compares it with sysfs: the kernel
	// shows it one per line.
	if o.BackendID == "" || len(o.BackendID) > 255 || strings.ContainsAny(o.BackendID, "\x00\n") {
		return n, fmt.Errorf("attach needs a backend identifier of 1 to 255 bytes without NUL or newline, not %q", o.BackendID)
	}
	if o.Connections < 0 || o.Timeout < 0 || o.DeadConnTimeout < 0 {
		return n, errors.New("attach: connections and timeouts must not be negative")
	}
	// The kernel counts both timeouts in seconds: a fraction would be
	// truncated, and a timeout under a second would become none at all.
	if o.Timeout%time.Second != 0 || o.DeadConnTimeout%time.Second != 0 {
		return n, errors.New("attach: the kernel's timeouts are whole seconds")
	}
	if o.Device != "" {
		i, err := nbd.ParseDevice(o.Device)
		if err != nil {
			return n, err
		}
		n.Index = i
	}
	return n, nil
}

// Attach serves the volume to a kernel nbd device and returns once the
// device is usable. k is the process's netlink connection to the nbd
// driver; it may be shared by every volume. ctx bounds only the setup.
func (v *Volume) Attach(ctx context.Context, k *nbd.Kernel, opts AttachOptions) error {
	return v.attach(ctx, k, opts, false)
}

// Reattach takes over the kernel device that a killed (or released)
// predecessor attached with the same BackendID: it finds the device by
// /sys/block/nbd*/backend and installs fresh sockets with RECONFIGURE once
// the kernel has found the old ones dead. The kernel holds the device's
// I/O meanwhile, for the DeadConnTimeout of the first Attach; ctx should
// end well before that. Open the volume with OpenOptions.Repair first when
// the predecessor was killed. It returns an error wrapping ErrNoDevice
// when no device has the backend identifier.
func (v *Volume) Reattach(ctx context.Context, k *nbd.Kernel, opts AttachOptions) error {
	return v.attach(ctx, k, opts, true)
}

func (v *Volume) attach(ctx context.Context, k *nbd.Kernel, opts AttachOptions, re bool) error {
	verb := attachVerb(re)
	no, err := opts.nbdOptions()
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, v.path, err)
	}
	done, err := v.beginAttach(verb)
	if err != nil {
		return err
	}
	defer done()
	srv, err := v.exportTo(opts.Server, no.Export, opts.OnIOError)
	if err != nil {
		return err
	}
	unexport := func() {
		if opts.Server != nil {
			// Nothing is connected to the export yet.
			opts.Server.Remove(context.Background(), no.Export)
		}
	}
	start := time.Now()
	var att *nbd.Attachment
	if re {
		index, ferr := nbd.FindBackend(opts.BackendID)
		switch {
		case errors.Is(ferr, os.ErrNotExist):
			unexport()
			return fmt.Errorf("reattach %s (backend %s): %w", v.path, opts.BackendID, ErrNoDevice)
		case ferr != nil:
			unexport()
			return fmt.Errorf("reattach %s: %w", v.path, ferr)
		case no.Index >= 0 && index != no.Index:
			unexport()
			return fmt.Errorf("reattach %s: backend %s is on %s, not %s", v.path, opts.BackendID, nbd.DevicePath(index), opts.Device)
		}
		att, err = k.Reattach(ctx, srv, no)
	} else {
		att, err = k.Connect(ctx, srv, no)
	}
	if err != nil {
		unexport()
		return fmt.Errorf("%s %s: %w", verb, v.path, err)
	}
	v.mu.Lock()
	v.att = att
	v.srv, v.export, v.sharedSrv = srv, no.Export, opts.Server != nil
	v.mu.Unlock()
	if re {
		// A grow whose process was killed between growing the stack and
		// resizing the device left the device short.
		v.resizeShortDevice()
	}
	klog.InfoS("serving: "+verb+"ed volume", "path", v.path, "device", att.Path(), "backend", opts.BackendID, "took", time.Since(start))
	return nil
}

func attachVerb(re bool) string {
	if re {
		return "reattach"
	}
	return "attach"
}

// beginAttach takes busy for an attach of either kind, failing when the
// volume already has a device.
func (v *Volume) beginAttach(verb string) (func(), error) {
	done, err := v.begin(verb)
	if err != nil {
		return nil, err
	}
	if v.att != nil {
		done()
		return nil, fmt.Errorf("%s %s: already attached to %s", verb, v.path, v.att.Path())
	}
	return done, nil
}

// resizeShortDevice grows the device to the volume's size when the kernel
// still has a smaller one. Called with busy held; failures are logged, the
// device keeps working at its old size.
func (v *Volume) resizeShortDevice() {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(v.att.Path()), "size"))
	if err != nil {
		klog.ErrorS(err, "serving: read device size", "device", v.att.Path())
		return
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		klog.ErrorS(err, "serving: parse device size", "device", v.att.Path())
		return
	}
	size := v.disk.Size()
	if sectors*512 >= size || size%4096 != 0 {
		return
	}
	if err := v.att.Resize(size); err != nil {
		klog.ErrorS(err, "serving: resize device to the volume's size", "device", v.att.Path())
		return
	}
	klog.InfoS("serving: resized device left short by an interrupted grow", "device", v.att.Path(), "from", sectors*512, "to", size)
}

// Device is the kernel device the volume is attached to ("/dev/nbdN"),
// or "" when it is not attached.
func (v *Volume) Device() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.att == nil {
		return ""
	}
	return v.att.Path()
}

// Gone is closed when the volume's device was disconnected by someone
// else (an administrator, or a detach that found no server); nil (never
// ready) when the volume is not attached.
func (v *Volume) Gone() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.att == nil {
		return nil
	}
	return v.att.Gone()
}
