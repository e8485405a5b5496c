package serving

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"k8s.io/klog/v2"
)

// Kind says what a Volume was opened from.
type Kind string

const (
	// KindStack is a stack directory (DiskDescriptor.xml and its deltas),
	// served whole; only stacks take online operations.
	KindStack Kind = "stack"
	// KindPloop is a single ploop image file.
	KindPloop Kind = "ploop"
	// KindRaw is a raw disk file.
	KindRaw Kind = "raw"
)

// ErrNotStack says an online operation was asked of a volume that is not a
// writable stack directory: single images have no snapshots.
var ErrNotStack = errors.New("online operations need a stack directory opened for writing")

// OpenOptions select how Open opens a volume.
type OpenOptions struct {
	// ReadOnly refuses writes; a read-only stack takes no directory lock.
	ReadOnly bool
	// Direct opens the image files with O_DIRECT, so that data is not
	// cached twice (in the image file's and the nbd device's page cache).
	Direct bool
	// Repair checks the volume and repairs it before opening. A process
	// that takes over from a killed one needs it: the top delta still
	// carries the in-use mark (ploop.ErrInUse), and an online operation
	// may have been interrupted. For a stack this is ploop.RepairStack,
	// which decides from the descriptor whether the interrupted operation
	// happened; for an image, ploop.Repair. It fails, changing nothing,
	// while another process still has the volume open for writing.
	Repair bool
}

// disk is what a Volume serves: a stack, an image or a raw file.
type disk interface {
	nbd.Backend
	Close() error
}

// Volume is one image or stack directory opened for serving by this
// process. Its methods are safe for concurrent use; online operations,
// attach and close are serialised by the volume.
type Volume struct {
	path     string
	kind     Kind
	readOnly bool
	disk     disk
	stack    *ploop.Stack // the same object as disk for KindStack, else nil

	// busy serialises the online operations with attach, the control
	// socket's start and the teardown, so that a grow's device resize
	// never races a detach and Close waits for a running merge. It is
	// held for as long as an operation runs, minutes for a merge.
	busy sync.Mutex
	// mu guards the fields below only for a moment, so that Device and
	// Gone answer while a merge holds busy. They change only with both
	// locks held, so a holder of busy may read them without mu.
	mu     sync.Mutex
	att    device
	srv    *nbd.Server // serves an nbd att; shared with other volumes when sharedSrv
	export string
	// sharedSrv: the export is removed from srv when the device goes.
	sharedSrv bool
	ctl       *controlServer
	closed    bool
}

// begin takes busy for an operation named what, failing once the volume
// is closed.
func (v *Volume) begin(what string) (func(), error) {
	v.busy.Lock()
	v.mu.Lock()
	closed := v.closed
	v.mu.Unlock()
	if closed {
		v.busy.Unlock()
		return nil, fmt.Errorf("%s %s: %w", what, v.path, os.ErrClosed)
	}
	return v.busy.Unlock, nil
}

// Open opens path for serving: a stack directory is served whole, a file
// with a ploop signature as a ploop image, anything else as a raw disk.
func Open(path string, opts OpenOptions) (*Volume, error) {
	kind, err := detect(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if opts.Repair && !opts.ReadOnly {
		if err := repair(path, kind); err != nil {
			return nil, err
		}
	}
	v := &Volume{path: path, kind: kind, readOnly: opts.ReadOnly}
	po := ploop.OpenOptions{ReadOnly: opts.ReadOnly, Direct: opts.Direct}
	switch kind {
	case KindStack:
		v.stack, err = ploop.OpenStack(path, ploop.StackOptions{ReadOnly: opts.ReadOnly, Direct: opts.Direct})
		v.disk = v.stack
	case KindPloop:
		v.disk, err = ploop.Open(path, po)
	default:
		v.disk, err = ploop.OpenRawWith(path, po)
	}
	if err != nil {
		// ploop already names the path in its errors.
		return nil, err
	}
	klog.V(1).InfoS("serving: opened volume", "path", path, "kind", kind, "readOnly", opts.ReadOnly, "direct", opts.Direct)
	return v, nil
}

// detect tells a stack directory, a ploop image and a raw file apart. A
// ploop signature with a bad header counts as ploop, so that Open reports
// the damage instead of serving the file raw.
func detect(path string) (Kind, error) {
	if ploop.IsStackDir(path) {
		return KindStack, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	hdr := make([]byte, ploop.HeaderSize)
	n, err := io.ReadFull(f, hdr)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read header: %w", err)
	}
	if _, err := ploop.ParseHeader(hdr[:n]); errors.Is(err, ploop.ErrNotPloop) {
		return KindRaw, nil
	}
	return KindPloop, nil
}

// repair brings a volume left by a killed server back to a state it can be
// opened in. Both repairs are no-ops on a clean volume.
func repair(path string, kind Kind) error {
	switch kind {
	case KindStack:
		rep, err := ploop.RepairStack(path)
		if err != nil {
			return fmt.Errorf("repair stack %s: %w", path, err)
		}
		if rep.Repaired {
			klog.InfoS("serving: repaired stack before opening it", "dir", path, "report", rep.String())
		}
	case KindPloop:
		rep, err := ploop.Repair(path)
		if err != nil {
			return fmt.Errorf("repair image %s: %w", path, err)
		}
		if rep.Repaired {
			klog.InfoS("serving: repaired image before opening it", "path", path, "report", rep.String())
		}
	}
	return nil
}

// Path is the stack directory or image file the volume was opened from.
func (v *Volume) Path() string { return v.path }

// Kind says whether the volume is a stack, a ploop image or a raw file.
func (v *Volume) Kind() Kind { return v.kind }

// ReadOnly reports whether the volume refuses writes.
func (v *Volume) ReadOnly() bool { return v.readOnly }

// Size is the current virtual disk size in bytes.
func (v *Volume) Size() int64 { return v.disk.Size() }

// Stack is the open stack of a KindStack volume, nil otherwise. Online
// operations must go through the Volume, which also resizes the device.
func (v *Volume) Stack() *ploop.Stack { return v.stack }

// description is what NBD clients are told the export is.
func (v *Volume) description() string { return string(v.kind) + " image " + v.path }

// newServer gives the volume an NBD server of its own.
func (v *Volume) newServer(export string) (*nbd.Server, error) {
	return v.exportTo(nil, export, nil)
}

// exportTo is the one place where a volume becomes an NBD export: of
// shared, or of a new server when shared is nil. A panic in the export's
// request path fails only this volume (see Failed).
func (v *Volume) exportTo(shared *nbd.Server, export string, onIOError func(error)) (*nbd.Server, error) {
	exp := nbd.Export{Name: export, Description: v.description(), Backend: v.disk, ReadOnly: v.readOnly, OnIOError: onIOError,
		OnFailure: func(err error) {
			klog.ErrorS(err, "serving: volume failed: its device returns I/O errors until it is detached", "path", v.path, "export", export)
		}}
	if shared != nil {
		if err := shared.Add(exp); err != nil {
			return nil, fmt.Errorf("serve %s: %w", v.path, err)
		}
		return shared, nil
	}
	srv, err := nbd.NewServer(exp)
	if err != nil {
		return nil, fmt.Errorf("serve %s: %w", v.path, err)
	}
	return srv, nil
}

// Failed returns why the volume's export failed (a panic in its request
// path, see nbd.Server.Failed and ublk.Device.Err), or nil: a failed volume answers every
// request with an I/O error until it is detached.
func (v *Volume) Failed() error {
	v.mu.Lock()
	srv, export, att := v.srv, v.export, v.att
	v.mu.Unlock()
	if u, ok := att.(ublkDevice); ok {
		return u.Err()
	}
	if srv == nil {
		return nil
	}
	return srv.Failed(export)
}

// Serve serves the volume to NBD clients as export name on l until ctx is
// cancelled or l fails; it closes l. It returns nil after cancellation.
func (v *Volume) Serve(ctx context.Context, l net.Listener, export string) error {
	if err := v.check(); err != nil {
		l.Close()
		return err
	}
	srv, err := v.newServer(export)
	if err != nil {
		l.Close()
		return err
	}
	err = srv.Serve(ctx, l)
	// nbd.Server.Serve closes l from another goroutine and may return
	// before that Close has finished (nbd.ListenUnix's listener removes
	// its socket there). Closing again removes it here, so a caller that
	// exits right after leaves no socket behind.
	l.Close()
	if err != nil {
		return fmt.Errorf("serve %s: %w", v.path, err)
	}
	return nil
}

// check fails once the volume is closed.
func (v *Volume) check() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return fmt.Errorf("volume %s: %w", v.path, os.ErrClosed)
	}
	return nil
}

// Flush makes every write the volume acknowledged durable.
func (v *Volume) Flush() error {
	if err := v.disk.Flush(); err != nil {
		return fmt.Errorf("flush %s: %w", v.path, err)
	}
	return nil
}

// Close detaches and closes the volume: it stops the control socket,
// disconnects the kernel device (its sockets are shut down when the kernel
// acknowledges; a device still held open, by a mount, keeps its index
// until the last holder closes it, see nbd.Kernel.Disconnect), flushes and
// closes the image files, clearing the in-use mark. A running online operation finishes first; operations asked for
// later fail with os.ErrClosed. Unmount the filesystem on the device
// before. Close is idempotent; it reports every failure but always
// releases what it can.
func (v *Volume) Close(ctx context.Context) error {
	return v.teardown(func(att device) error {
		if err := att.Disconnect(ctx); err != nil {
			return fmt.Errorf("detach %s: %w", v.path, err)
		}
		return nil
	})
}

// Release stops serving but leaves the kernel device connected, its I/O
// held by the kernel for DeadConnTimeout: a planned restart, after which a
// successor calls Reattach. The image is flushed and closed cleanly, so the
// successor needs no repair. Release is idempotent, and a no-op after Close.
func (v *Volume) Release() error {
	return v.teardown(func(att device) error {
		att.Release()
		return nil
	})
}

// teardown closes the volume, letting go of its device with detach.
func (v *Volume) teardown(detach func(device) error) error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return nil
	}
	// From here on new operations fail; the control socket is stopped
	// before taking busy, because the requests it waits for may be
	// waiting for busy themselves.
	v.closed = true
	ctl := v.ctl
	v.ctl = nil
	v.mu.Unlock()
	var errs []error
	if ctl != nil {
		errs = append(errs, ctl.Close())
	}
	v.busy.Lock()
	defer v.busy.Unlock()
	v.mu.Lock()
	att, srv, export, shared := v.att, v.srv, v.export, v.sharedSrv
	v.att, v.srv = nil, nil
	v.mu.Unlock()
	if att != nil {
		errs = append(errs, detach(att))
	}
	if shared {
		// The device is gone or released: its connections have ended.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		errs = append(errs, srv.Remove(ctx, export))
		cancel()
	}
	errs = append(errs, v.closeDisk())
	return errors.Join(errs...)
}

// closeDisk flushes and closes the image files. Called with busy held.
func (v *Volume) closeDisk() error {
	err := v.disk.Flush()
	if cerr := v.disk.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("close %s: %w", v.path, err)
	}
	klog.V(1).InfoS("serving: closed volume", "path", v.path)
	return nil
}

// ControlPath is where a served stack directory's control socket lives:
// inside the directory, so that whoever can name the stack finds it.
func ControlPath(dir string) string { return filepath.Join(dir, ControlName) }

// ControlName is the control socket's file name inside a stack directory.
// A lock file named ControlName+".lock" stays next to it (see
// ownedListener).
const ControlName = ".ploopctl.sock"
