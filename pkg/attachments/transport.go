package attachments

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/ploop-csi/ploop-csi/pkg/serving"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
)

// Transport is how a ploop volume reaches the kernel.
type Transport string

const (
	// TransportNBD serves the volume to a kernel nbd device over
	// socketpairs: every kernel has it, and a device grows online.
	TransportNBD Transport = "nbd"
	// TransportUblk serves the volume to a ublk device through io_uring
	// (Linux 6.0 and later, with user recovery and reissue): several
	// times the speed of nbd, but on kernels without UBLK_F_UPDATE_SIZE
	// an attached volume cannot grow until it is unstaged.
	TransportUblk Transport = "ublk"
	// TransportAuto, a node default only, takes ublk when the kernel
	// passes the start-up self-test, nbd otherwise.
	TransportAuto Transport = "auto"
)

// ParseTransport checks a transport's name; "" is the node's default.
func ParseTransport(s string, auto bool) (Transport, error) {
	switch t := Transport(s); t {
	case "", TransportNBD, TransportUblk:
		return t, nil
	case TransportAuto:
		if auto {
			return t, nil
		}
	}
	want := "nbd or ublk"
	if auto {
		want = "auto, nbd or ublk"
	}
	return "", fmt.Errorf("attach transport %q is not %s: %w", s, want, ErrInvalid)
}

// openUblk opens /dev/ublk-control when this kernel's ublk passes the
// self-test, and settles the node's default transport. Without ublk a
// node still serves nbd; only an explicit ublk default fails.
func (m *Manager) openUblk() error {
	ctrl, err := ublk.OpenControl()
	if err == nil {
		if err = ublk.SelfTest(ctrl); err != nil {
			ctrl.Close()
		}
	}
	if err != nil {
		m.ublkWhy = err.Error()
	} else {
		m.ublk = ctrl
	}
	switch m.opts.Attach.Transport {
	case TransportUblk:
		if m.ublk == nil {
			return fmt.Errorf("attach through ublk was asked for, but this node cannot: %s: %w", m.ublkWhy, ErrInvalid)
		}
		m.transport = TransportUblk
	case TransportAuto:
		m.transport = TransportNBD
		if m.ublk != nil {
			m.transport = TransportUblk
		}
	default:
		m.transport = TransportNBD
	}
	m.log.Info("attach transport", "default", m.transport, "ublk", m.ublk != nil, "ublkUnavailable", m.ublkWhy)
	return nil
}

// Transport is the node's default transport, and whether ublk can be
// asked for by a volume.
func (m *Manager) Transport() (def Transport, ublkOK bool) { return m.transport, m.ublk != nil }

// ublkControl returns the node's ublk control, or why there is none.
func (m *Manager) ublkControl() (*ublk.Control, error) {
	if m.ublk == nil {
		return nil, fmt.Errorf("this node cannot attach volumes through ublk (%s); ask for nbd or fix the node: %w", m.ublkWhy, ErrUnavailable)
	}
	return m.ublk, nil
}

// ublkOptions are the serving options of volume id over ublk.
func (m *Manager) ublkOptions(id string) serving.UblkOptions {
	o := serving.UblkOptions{Control: m.ublk, BackendID: id, Queues: m.opts.Attach.UblkQueues}
	if obs := m.opts.Observer; obs != nil {
		o.OnIOError = func(error) { obs.IOError(id) }
	}
	return o
}

// serveUblk attaches v through ublk: to the device a predecessor left
// (killed or released), or to a new one.
func (m *Manager) serveUblk(ctx context.Context, v *serving.Volume, id string) error {
	ctrl, err := m.ublkControl()
	if err != nil {
		return err
	}
	opts := m.ublkOptions(id)
	info, found, err := serving.FindUblk(ctrl, id)
	if err != nil {
		return err
	}
	if found && info.State == ublk.StateDead {
		// Stopped (by someone else, or by an unstage killed before its
		// delete) or never started (a crash between add and start):
		// nothing to recover, and in the way of a new device.
		m.log.Info("delete a ublk device that was left stopped", "volume", id, "device", ublkDevicePath(info.ID))
		if err := deleteUblk(ctx, ctrl, info.ID); err != nil {
			return err
		}
		found = false
	}
	if !found {
		return v.AttachUblk(ctx, opts)
	}
	rctx, cancel := context.WithTimeout(ctx, m.opts.RecoveryTimeout)
	err = v.ReattachUblk(rctx, opts)
	cancel()
	if obs := m.opts.Observer; obs != nil && !errors.Is(err, serving.ErrNoDevice) {
		obs.Reattached(id, err)
	}
	if errors.Is(err, serving.ErrNoDevice) {
		// Deleted in between.
		err = v.AttachUblk(ctx, opts)
	}
	return err
}

// deleteUblk deletes a stopped device, giving up when ctx ends: the kernel
// waits until nothing holds the device (a filesystem still mounted on
// it), and then the delete finishes on its own, later.
func deleteUblk(ctx context.Context, ctrl *ublk.Control, id uint32) error {
	done := make(chan error, 1)
	go func() { done <- ctrl.Delete(id) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%s is still held (a filesystem mounted on it?): unmount it; it is deleted once let go: %w", ublkDevicePath(id), ErrUnavailable)
	}
}

// findDevice returns the kernel device that carries volume id over
// transport t, "" when there is none.
func (m *Manager) findDevice(id string, t Transport, nbdBackends map[string]string) (string, error) {
	if t != TransportUblk {
		return nbdBackends[id], nil
	}
	if m.ublk == nil {
		return "", nil
	}
	info, found, err := serving.FindUblk(m.ublk, id)
	if err != nil || !found {
		return "", err
	}
	if info.State == ublk.StateDead {
		// Stopped or never started: no device to take over. Recovery
		// treats the volume as detached (restaged, or reported when its
		// filesystem is still mounted); a later stage deletes it.
		return "", nil
	}
	return ublkDevicePath(info.ID), nil
}

func ublkDevicePath(id uint32) string { return "/dev/ublkb" + strconv.FormatUint(uint64(id), 10) }

// parseUblkDevice checks a recorded "/dev/ublkbN".
func parseUblkDevice(dev string) error {
	n, ok := strings.CutPrefix(dev, "/dev/ublkb")
	id, err := strconv.ParseUint(n, 10, 32)
	if !ok || err != nil || ublkDevicePath(uint32(id)) != dev {
		return fmt.Errorf("device %q is not /dev/ublkbN: %w", dev, ErrInvalid)
	}
	return nil
}

// removeUblk stops and deletes the ublk device of a volume this process
// does not serve (its server died, or recovery failed): its held I/O
// fails. Its filesystem must be unmounted first: the kernel deletes a
// device only once nothing holds it.
func (m *Manager) removeUblk(ctx context.Context, id string) error {
	if m.ublk == nil {
		return nil
	}
	info, found, err := serving.FindUblk(m.ublk, id)
	if err != nil || !found {
		return err
	}
	m.log.Info("remove a ublk device this process does not serve", "volume", id, "device", ublkDevicePath(info.ID))
	if err := m.ublk.Stop(info.ID); err != nil && !errors.Is(err, os.ErrNotExist) {
		m.log.Error(err, "stop ublk device before deleting it", "volume", id)
	}
	return deleteUblk(ctx, m.ublk, info.ID)
}

// ublkMax is how many ublk devices the kernel allows (ublk_drv's
// ublks_max, 64 by default).
func ublkMax() int {
	b, err := os.ReadFile("/sys/module/ublk_drv/parameters/ublks_max")
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}
