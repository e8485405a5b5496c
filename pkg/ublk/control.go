package ublk

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/uring"
)

// ControlPath is ublk's control device; it exists once ublk_drv is loaded.
const ControlPath = "/dev/ublk-control"

// Control issues commands on /dev/ublk-control. Commands are serialised:
// they are rare (add, start, stop, delete) and some block in the kernel.
type Control struct {
	mu   sync.Mutex
	file *os.File
	ring *uring.Raw // 128-byte SQEs: the control command does not fit in 64
}

// OpenControl opens the control device. Without ublk_drv the error says so.
func OpenControl() (*Control, error) {
	f, err := os.OpenFile(ControlPath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		// err names the path.
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w (is the ublk_drv module loaded? it needs Linux 6.0 or later)", err)
		}
		return nil, err
	}
	r, err := uring.NewRaw(4, uring.SetupSQE128)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ublk control: %w", err)
	}
	return &Control{file: f, ring: r}, nil
}

// Close releases the control device; devices live on.
func (c *Control) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ring != nil {
		c.ring.Close()
		c.ring = nil
	}
	return c.file.Close()
}

// command issues one control command and returns the kernel's result;
// buf (may be nil) is the command's in/out buffer.
func (c *Control) command(op uint32, cmd ctrlCmd, buf []byte) (int32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ring == nil {
		return 0, errors.New("ublk control: closed")
	}
	return c.issue(c.ring, op, cmd, buf)
}

// issue runs one command on ring, which the caller owns.
func (c *Control) issue(ring *uring.Raw, op uint32, cmd ctrlCmd, buf []byte) (int32, error) {
	var pin runtime.Pinner
	defer pin.Unpin()
	if len(buf) > 0 {
		pin.Pin(&buf[0])
		cmd.addr = uint64(addrOf(buf))
		cmd.len = uint16(len(buf))
	}
	payload := cmd.encode()
	if err := ring.Push(func(sqe []byte) {
		code := iowr(op, ctrlCmdSize)
		if op == cmdGetFeatures || op == cmdGetDevInfo {
			code = ior(op, ctrlCmdSize)
		}
		uring.PrepURingCmd(sqe, int(c.file.Fd()), code, uint64(op), payload)
	}); err != nil {
		return 0, err
	}
	if err := ring.Enter(1); err != nil {
		return 0, err
	}
	var res int32
	got := false
	ring.Reap(func(_ uint64, r int32) { res, got = r, true })
	if !got {
		return 0, errors.New("ublk control: no completion")
	}
	if res < 0 {
		return res, unix.Errno(-res)
	}
	return res, nil
}

// Features reports the UBLK_F_* flags the kernel supports.
func (c *Control) Features() (uint64, error) {
	buf := make([]byte, 8)
	if _, err := c.command(cmdGetFeatures, ctrlCmd{devID: ^uint32(0), queueID: ^uint16(0)}, buf); err != nil {
		return 0, fmt.Errorf("ublk get features: %w", err)
	}
	return le.Uint64(buf), nil
}

// Info returns what the kernel knows of device id.
func (c *Control) Info(id uint32) (DevInfo, error) {
	buf := make([]byte, devInfoSize)
	if _, err := c.command(cmdGetDevInfo, ctrlCmd{devID: id, queueID: ^uint16(0)}, buf); err != nil {
		return DevInfo{}, fmt.Errorf("ublk get info of device %d: %w", id, err)
	}
	return decodeDevInfo(buf)
}

// add creates a device (id ^0 lets the kernel choose) and returns it as
// the kernel set it up.
func (c *Control) add(want DevInfo) (DevInfo, error) {
	buf := want.encode()
	if _, err := c.command(cmdAddDev, ctrlCmd{devID: want.ID, queueID: ^uint16(0)}, buf); err != nil {
		return DevInfo{}, fmt.Errorf("ublk add device: %w", err)
	}
	return decodeDevInfo(buf)
}

func (c *Control) setParams(id uint32, p params) error {
	if _, err := c.command(cmdSetParams, ctrlCmd{devID: id, queueID: ^uint16(0)}, p.encode()); err != nil {
		return fmt.Errorf("ublk set parameters of device %d: %w", id, err)
	}
	return nil
}

// start makes the block device appear; the kernel waits until every
// queue has fetched every tag.
func (c *Control) start(id uint32) error {
	if _, err := c.command(cmdStartDev, ctrlCmd{devID: id, queueID: ^uint16(0), data: uint64(os.Getpid())}, nil); err != nil {
		return fmt.Errorf("ublk start device %d: %w", id, err)
	}
	return nil
}

// Stop removes the block device; requests in flight are finished first,
// so its server must still be serving.
func (c *Control) Stop(id uint32) error {
	if _, err := c.command(cmdStopDev, ctrlCmd{devID: id, queueID: ^uint16(0)}, nil); err != nil {
		return fmt.Errorf("ublk stop device %d: %w", id, err)
	}
	return nil
}

// Delete removes a device. The kernel waits until nothing holds the
// device any more: no server with its char device (/dev/ublkcN) open or
// mapped, and no user of its block device (an open file, a mount), so
// stop it and let go of it first; a device whose server died is stopped
// the same way (its held requests fail).
//
// The wait happens on a ring of the call's own, not under the Control's
// lock: a device someone still holds must not stop the commands of every
// other device of the process.
func (c *Control) Delete(id uint32) error {
	ring, err := uring.NewRaw(2, uring.SetupSQE128)
	if err != nil {
		return fmt.Errorf("ublk delete device %d: %w", id, err)
	}
	defer ring.Close()
	c.mu.Lock()
	closed := c.ring == nil
	c.mu.Unlock()
	if closed {
		return fmt.Errorf("ublk delete device %d: control closed", id)
	}
	if _, err := c.issue(ring, cmdDelDev, ctrlCmd{devID: id, queueID: ^uint16(0)}, nil); err != nil {
		return fmt.Errorf("ublk delete device %d: %w", id, err)
	}
	return nil
}

// Find returns the devices whose Tag is tag, as a restarted server looks
// for what it served. The kernel lists its devices in /sys/class/ublk-char.
func (c *Control) Find(tag uint64) ([]DevInfo, error) {
	entries, err := os.ReadDir("/sys/class/ublk-char")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list ublk devices: %w", err)
	}
	var found []DevInfo
	for _, e := range entries {
		n, ok := strings.CutPrefix(e.Name(), "ublkc")
		id, err := strconv.ParseUint(n, 10, 32)
		if !ok || err != nil {
			continue
		}
		info, err := c.Info(uint32(id))
		if errors.Is(err, unix.ENODEV) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		if info.ServerData == tag {
			found = append(found, info)
		}
	}
	return found, nil
}
