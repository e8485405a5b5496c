package nbd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Generic netlink interface of the kernel nbd driver
// (include/uapi/linux/nbd-netlink.h).
const (
	genlFamily    = "nbd"
	genlMcastName = "nbd_mc_group"

	nlCmdConnect     = 1
	nlCmdDisconnect  = 2
	nlCmdReconfigure = 3
	nlCmdLinkDead    = 4
	nlCmdStatus      = 5

	nlAttrIndex             = 1
	nlAttrSizeBytes         = 2
	nlAttrBlockSizeBytes    = 3
	nlAttrTimeout           = 4
	nlAttrServerFlags       = 5
	nlAttrClientFlags       = 6
	nlAttrSockets           = 7
	nlAttrDeadConnTimeout   = 8
	nlAttrDeviceList        = 9
	nlAttrBackendIdentifier = 10

	nlSockItem = 1
	nlSockFD   = 1

	nlDeviceItem      = 1
	nlDeviceIndex     = 1
	nlDeviceConnected = 2
)

// AttachOptions describe how an export is connected to a kernel device.
type AttachOptions struct {
	// BackendID names what the device serves (a volume id). The kernel
	// shows it in /sys/block/nbdN/backend, which is how a restarted
	// server finds its devices again. Required.
	BackendID string
	// Export selects the server's export; "" is the default export.
	Export string
	// Connections is the number of sockets (default 1). With more than
	// one, the kernel resends a request that has run for 30 s (or
	// Timeout) on another connection; see the package documentation.
	Connections int
	// Index asks for /dev/nbd<Index>; negative (AnyDevice) takes any free
	// device. The zero value means nbd0, so callers usually set AnyDevice.
	Index int
	// Timeout is the kernel's per-request timeout, in whole seconds
	// (rounded up). Zero, the default, sets none: with one connection the
	// kernel then waits for a slow request for as long as it takes,
	// logging "Possible stuck request" every 30 s. With a timeout, the
	// kernel shuts the connection down when it expires and resends the
	// request on another one (after a RECONFIGURE when there is no
	// other); see the package documentation.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds I/O while every
	// connection is dead, waiting for a RECONFIGURE (default 120s). It is
	// what lets a restarted server take over without I/O errors. Whole
	// seconds, rounded up.
	DeadConnTimeout time.Duration
}

// AnyDevice in AttachOptions.Index lets the kernel pick a free device.
const AnyDevice = -1

// ErrDisconnected is returned by Reattach when the device was disconnected
// (it is still configured only because something holds it open), so no
// connection can ever be installed in it again.
var ErrDisconnected = errors.New("nbd: device was disconnected")

func (o *AttachOptions) defaults() error {
	if o.BackendID == "" {
		return errors.New("nbd: attach needs a backend identifier")
	}
	if strings.ContainsAny(o.BackendID, "\x00\n") || len(o.BackendID) > 255 {
		return fmt.Errorf("nbd: invalid backend identifier %q", o.BackendID)
	}
	if o.Connections <= 0 {
		o.Connections = 1
	}
	if o.Connections > 64 {
		return fmt.Errorf("nbd: %d connections is too many", o.Connections)
	}
	if o.Timeout < 0 {
		return fmt.Errorf("nbd: negative timeout %v", o.Timeout)
	}
	if o.DeadConnTimeout <= 0 {
		o.DeadConnTimeout = 120 * time.Second
	}
	return nil
}

// Kernel talks to the nbd driver over generic netlink.
type Kernel struct {
	c      *genetlink.Conn
	family genetlink.Family
}

// OpenKernel connects to the nbd netlink family, loading the nbd module
// when the family is missing.
func OpenKernel() (*Kernel, error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial generic netlink: %w", err)
	}
	f, err := c.GetFamily(genlFamily)
	if errors.Is(err, os.ErrNotExist) {
		if out, merr := exec.Command("modprobe", "nbd").CombinedOutput(); merr != nil {
			c.Close()
			return nil, fmt.Errorf("nbd: kernel module nbd is not loaded and modprobe failed: %v: %s", merr, strings.TrimSpace(string(out)))
		}
		f, err = c.GetFamily(genlFamily)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("nbd: generic netlink family %q: %w", genlFamily, err)
	}
	return &Kernel{c: c, family: f}, nil
}

// Close releases the netlink socket; attached devices stay attached.
func (k *Kernel) Close() error { return k.c.Close() }

func (k *Kernel) execute(cmd uint8, ack bool, encode func(ae *netlink.AttributeEncoder)) ([]genetlink.Message, error) {
	ae := netlink.NewAttributeEncoder()
	encode(ae)
	data, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	flags := netlink.Request
	if ack {
		// Only for commands without a reply message: an ack after a
		// reply would be left unread in the socket.
		flags |= netlink.Acknowledge
	}
	return k.c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: k.family.Version},
		Data:   data,
	}, k.family.ID, flags)
}

// DevicePath is the block device node of nbd device index.
func DevicePath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }

// ParseDevice returns the index of a /dev/nbdN path.
func ParseDevice(path string) (int, error) {
	s, ok := strings.CutPrefix(path, "/dev/nbd")
	if !ok {
		return 0, fmt.Errorf("nbd: %q is not an nbd device", path)
	}
	i, err := strconv.Atoi(s)
	if err != nil || i < 0 {
		return 0, fmt.Errorf("nbd: %q is not an nbd device", path)
	}
	return i, nil
}

// Attachment is an export served to one kernel device by this process.
type Attachment struct {
	k      *Kernel
	srv    *Server
	opts   AttachOptions
	index  int
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu   sync.Mutex
	live int // connections currently served
	// changed is signalled (non-blocking) whenever a connection ends or
	// the kernel reports a dead link, to wake the maintainer.
	changed chan struct{}
	closing bool
	gone    chan struct{} // closed when the device was disconnected behind our back
}

// Gone is closed when the device was disconnected by someone else (for
// example `ploopctl detach` falling back to netlink, or an admin), also
// while a mount still holds it: the attachment then stops serving, and
// its Disconnect leaves the index, which a new device may take once the
// holder lets go, alone.
func (a *Attachment) Gone() <-chan struct{} { return a.gone }

// Index is the nbd device index.
func (a *Attachment) Index() int { return a.index }

// Path is the device node, /dev/nbdN.
func (a *Attachment) Path() string { return DevicePath(a.index) }

// Connect serves srv's export to a kernel device through
// opts.Connections socketpairs and returns once the device is usable.
// ctx only bounds the setup: the attachment lives until Disconnect or
// Release.
func (k *Kernel) Connect(ctx context.Context, srv *Server, opts AttachOptions) (*Attachment, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("nbd: connect %s: %w", opts.BackendID, err)
	}
	exp := srv.lookup(opts.Export)
	if exp == nil {
		return nil, fmt.Errorf("nbd: no export %q", opts.Export)
	}
	pairs, err := socketpairs(opts.Connections)
	if err != nil {
		return nil, err
	}
	msgs, err := k.execute(nlCmdConnect, false, func(ae *netlink.AttributeEncoder) {
		if opts.Index >= 0 {
			ae.Uint32(nlAttrIndex, uint32(opts.Index))
		}
		ae.Uint64(nlAttrSizeBytes, uint64(exp.Backend.Size()))
		ae.Uint64(nlAttrBlockSizeBytes, 4096)
		ae.Uint64(nlAttrServerFlags, uint64(exp.transmissionFlags()))
		ae.Uint64(nlAttrTimeout, uint64((opts.Timeout+time.Second-1)/time.Second))
		ae.Uint64(nlAttrDeadConnTimeout, uint64((opts.DeadConnTimeout+time.Second-1)/time.Second))
		ae.String(nlAttrBackendIdentifier, opts.BackendID)
		ae.Nested(nlAttrSockets, func(nae *netlink.AttributeEncoder) error {
			for _, p := range pairs {
				nae.Nested(nlSockItem, func(sae *netlink.AttributeEncoder) error {
					sae.Uint32(nlSockFD, uint32(p.kernel))
					return nil
				})
			}
			return nil
		})
	})
	for i := range pairs {
		// The kernel holds its own references to the sockets it took.
		unix.Close(pairs[i].kernel)
		pairs[i].kernel = -1
	}
	if err != nil {
		closeAll(pairs)
		return nil, fmt.Errorf("nbd: connect %s: %w", opts.BackendID, err)
	}
	index := -1
	for _, m := range msgs {
		ad, derr := netlink.NewAttributeDecoder(m.Data)
		if derr != nil {
			continue
		}
		for ad.Next() {
			if ad.Type() == nlAttrIndex {
				index = int(ad.Uint32())
			}
		}
	}
	if index < 0 {
		closeAll(pairs)
		return nil, fmt.Errorf("nbd: connect %s: kernel did not say which device it used", opts.BackendID)
	}
	a := k.newAttachment(srv, opts, index)
	for _, p := range pairs {
		if err := a.serve(p.ours); err != nil {
			klog.ErrorS(err, "nbd: serve connection", "device", a.Path())
		}
	}
	go a.maintain(nil)
	return a, nil
}

func (k *Kernel) newAttachment(srv *Server, opts AttachOptions, index int) *Attachment {
	ctx, cancel := context.WithCancel(context.Background())
	return &Attachment{k: k, srv: srv, opts: opts, index: index, ctx: ctx, cancel: cancel, changed: make(chan struct{}, 1), gone: make(chan struct{})}
}

// serve runs one connection until the kernel or Close ends it.
func (a *Attachment) serve(fd int) error {
	f := os.NewFile(uintptr(fd), "nbd-socket")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("nbd: socket for %s: %w", a.Path(), err)
	}
	a.mu.Lock()
	a.live++
	a.mu.Unlock()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		err := a.srv.ServeTransmission(a.ctx, nc, a.opts.Export)
		a.mu.Lock()
		a.live--
		a.mu.Unlock()
		klog.V(2).InfoS("nbd: kernel connection ended", "device", a.Path(), "err", err)
		a.poke()
	}()
	return nil
}

func (a *Attachment) poke() {
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// maintain keeps opts.Connections sockets in the device: when one ends
// while the attachment is open (the kernel timed it out and marked it
// dead), a fresh one replaces it. firstDone, if set, is closed when the
// first socket was installed.
func (a *Attachment) maintain(firstDone chan<- error) {
	dead, stopWatch := a.k.watchLinkDead(a.ctx, a.index)
	defer stopWatch()
	backoff := 50 * time.Millisecond
	refusals := 0
	for {
		a.mu.Lock()
		missing := a.opts.Connections - a.live
		closing := a.closing
		a.mu.Unlock()
		if closing {
			return
		}
		if missing > 0 {
			ok, err := a.reconnectOne()
			switch {
			case err != nil:
				if a.lost(err) {
					a.mu.Lock()
					closing := a.closing // our own Disconnect got there first
					a.mu.Unlock()
					if !closing {
						klog.InfoS("nbd: device was disconnected by someone else; no longer serving it", "device", a.Path(), "backend", a.opts.BackendID, "reason", err)
						close(a.gone)
					}
					return
				}
				klog.ErrorS(err, "nbd: replace connection", "device", a.Path())
			case ok:
				refusals, backoff = 0, 50*time.Millisecond
				if firstDone != nil {
					close(firstDone)
					firstDone = nil
				}
				continue
			default:
				refusals++
			}
			// After a successful reattach the device may simply have
			// fewer slots than asked for: stop polling then, and rely on
			// LINK_DEAD and connection ends to wake us.
			if firstDone == nil && refusals > 20 {
				missing = 0
			}
		}
		var retry <-chan time.Time
		if missing > 0 {
			retry = time.After(backoff)
			backoff = min(2*backoff, time.Second)
		}
		select {
		case <-a.ctx.Done():
			return
		case <-a.changed:
		case <-dead:
		case <-retry:
		}
	}
}

// lost reports whether err from reconnectOne means that the device is no
// longer the one this attachment serves.
func (a *Attachment) lost(err error) bool {
	if errors.Is(err, ErrDisconnected) {
		return true
	}
	connected, serr := a.k.Status(a.index)
	return serr == nil && !connected
}

// reconnectOne offers the kernel one fresh socket with RECONFIGURE. The
// kernel only takes it if one of the device's sockets is dead, and says
// nothing either way; but when it declines it drops its reference at
// once, so after closing our copy of its end, our end sees a hang-up.
// That tells the two cases apart without guessing.
//
// EINVAL means the device is not ours any more (ErrDisconnected). In
// nbd_genl_reconfigure (6.1) a request like ours, with an index, our
// backend identifier and one unix stream socket, gets EINVAL only when the
// index has no device or one going down, the device serves another
// backend, it has no configuration ("not configured, cannot reconfigure"),
// or its configuration is no longer bound to netlink or has no pid (same
// message): DISCONNECT clears the bound flag before it returns, even while
// openers keep the configuration alive. A live device that has no dead
// socket to replace answers 0 (nbd_reconnect_socket's -ENOSPC is turned
// into success), and a timed-out or dead-conn-expired device stays bound,
// so neither is ever taken for a disconnected one.
func (a *Attachment) reconnectOne() (bool, error) {
	pairs, err := socketpairs(1)
	if err != nil {
		return false, err
	}
	p := pairs[0]
	_, err = a.k.execute(nlCmdReconfigure, true, func(ae *netlink.AttributeEncoder) {
		ae.Uint32(nlAttrIndex, uint32(a.index))
		ae.String(nlAttrBackendIdentifier, a.opts.BackendID)
		ae.Nested(nlAttrSockets, func(nae *netlink.AttributeEncoder) error {
			nae.Nested(nlSockItem, func(sae *netlink.AttributeEncoder) error {
				sae.Uint32(nlSockFD, uint32(p.kernel))
				return nil
			})
			return nil
		})
	})
	unix.Close(p.kernel)
	if err != nil {
		unix.Close(p.ours)
		if errors.Is(err, unix.EINVAL) {
			return false, fmt.Errorf("nbd: reconfigure %s: %w: %w", a.Path(), ErrDisconnected, err)
		}
		return false, fmt.Errorf("nbd: reconfigure %s: %w", a.Path(), err)
	}
	fds := []unix.PollFd{{Fd: int32(p.ours), Events: unix.POLLRDHUP}}
	if _, err := unix.Poll(fds, 0); err != nil {
		unix.Close(p.ours)
		return false, fmt.Errorf("nbd: poll new socket: %w", err)
	}
	if fds[0].Revents&(unix.POLLHUP|unix.POLLRDHUP) != 0 {
		unix.Close(p.ours)
		return false, nil
	}
	klog.V(1).InfoS("nbd: installed fresh connection", "device", a.Path())
	return true, a.serve(p.ours)
}

// Reattach takes over a device that a previous process attached with the
// same BackendID and that is still connected in the kernel (its I/O held
// by DEAD_CONN_TIMEOUT). It returns once at least one fresh connection is
// installed, which needs the kernel to have noticed that the old ones are
// dead; the remaining ones are replaced in the background as they die.
func (k *Kernel) Reattach(ctx context.Context, srv *Server, opts AttachOptions) (*Attachment, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if srv.lookup(opts.Export) == nil {
		return nil, fmt.Errorf("nbd: no export %q", opts.Export)
	}
	index, err := FindBackend(opts.BackendID)
	if err != nil {
		return nil, err
	}
	if connected, err := k.Status(index); err != nil {
		return nil, err
	} else if !connected {
		return nil, fmt.Errorf("nbd: %s (backend %s) is no longer connected", DevicePath(index), opts.BackendID)
	}
	a := k.newAttachment(srv, opts, index)
	first := make(chan error)
	go a.maintain(first)
	select {
	case <-first:
		return a, nil
	case <-a.gone:
		a.abandon()
		return nil, fmt.Errorf("nbd: reattach %s (backend %s): %w; it stays configured until whatever holds it open closes it", a.Path(), opts.BackendID, ErrDisconnected)
	case <-ctx.Done():
		a.abandon()
		return nil, fmt.Errorf("nbd: reattach %s: no dead connection to replace: %w", a.Path(), ctx.Err())
	}
}

// abandon stops serving without touching the kernel device.
func (a *Attachment) abandon() {
	a.mu.Lock()
	a.closing = true
	a.mu.Unlock()
	a.cancel()
	a.wg.Wait()
}

// Release stops serving but leaves the device connected, with its I/O
// held for DEAD_CONN_TIMEOUT: what a process does before a restart (a
// SIGKILL does the same implicitly).
func (a *Attachment) Release() { a.abandon() }

// Disconnect detaches the device, with the semantics of Kernel.Disconnect,
// and stops serving it. It is idempotent. After Gone it leaves the kernel
// alone: the index may already belong to another device.
func (a *Attachment) Disconnect(ctx context.Context) error {
	a.mu.Lock()
	a.closing = true
	a.mu.Unlock()
	var err error
	select {
	case <-a.gone:
	default:
		err = a.k.disconnect(ctx, a.index, a.opts.BackendID)
	}
	// Our connections end when the kernel shuts its sockets down; the
	// cancel covers the case where it already had.
	a.cancel()
	a.wg.Wait()
	return err
}

// Resize announces a new size (online grow) to the device.
func (a *Attachment) Resize(size int64) error {
	if size <= 0 || size%4096 != 0 {
		return fmt.Errorf("nbd: resize %s to %d: size must be a positive multiple of 4096", a.Path(), size)
	}
	_, err := a.k.execute(nlCmdReconfigure, true, func(ae *netlink.AttributeEncoder) {
		ae.Uint32(nlAttrIndex, uint32(a.index))
		ae.String(nlAttrBackendIdentifier, a.opts.BackendID)
		ae.Uint64(nlAttrSizeBytes, uint64(size))
	})
	if err != nil {
		return fmt.Errorf("nbd: resize %s to %d: %w", a.Path(), size, err)
	}
	return nil
}

// Disconnect disconnects device index. Disconnecting a device that is not
// connected succeeds, and so does disconnecting one again.
//
// The kernel does the whole disconnect before it acknowledges the command
// (nbd_genl_disconnect, nbd_disconnect_and_put in 6.1): it sends the
// server NBD_CMD_DISC, shuts every socket down, waits for its receive
// workers to exit, fails the requests queued on the device and unbinds it
// from netlink. When Disconnect returns, the device's I/O therefore fails
// with EIO at once (nothing waits for DEAD_CONN_TIMEOUT), no request
// reaches the server any more, and the serving process's attachment
// reports Gone once it notices.
//
// If nothing holds the device open, the kernel also frees its
// configuration before the acknowledgement: STATUS says disconnected and
// the index is free. A device held open (a mounted filesystem, an open
// descriptor) keeps its configuration until the last holder closes it,
// which frees it synchronously (nbd_release): until then STATUS still
// says connected, /sys/block/nbdN/backend and pid remain, and CONNECT to
// that index fails with EBUSY. Disconnect does not wait for that, since it
// may never happen while a mount stays; there is no other signal of the
// state to wait for (the pid file goes with the configuration). Disconnect
// again on such a device only repeats the shutdown, logging "Send
// disconnect failed" in the kernel log.
//
// ctx is checked before the command is sent; the kernel's part is not
// interruptible.
func (k *Kernel) Disconnect(ctx context.Context, index int) error {
	return k.disconnect(ctx, index, "")
}

// disconnect disconnects device index if it is connected and, when
// backend is set, still serves backend.
func (k *Kernel) disconnect(ctx context.Context, index int, backend string) error {
	connected, err := k.Status(index)
	if err != nil {
		return err
	}
	if !connected {
		return nil
	}
	if backend != "" {
		p := filepath.Join("/sys/block", "nbd"+strconv.Itoa(index), "backend")
		b, err := os.ReadFile(p)
		if errors.Is(err, os.ErrNotExist) {
			return nil // released meanwhile
		}
		if err != nil {
			return fmt.Errorf("nbd: disconnect %s: %w", DevicePath(index), err)
		}
		if got := strings.TrimRight(string(b), "\n"); got != backend {
			klog.InfoS("nbd: not disconnecting a device that serves another backend now", "device", DevicePath(index), "backend", got, "ours", backend)
			return nil
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("nbd: disconnect %s: %w", DevicePath(index), err)
	}
	if _, err := k.execute(nlCmdDisconnect, true, func(ae *netlink.AttributeEncoder) {
		ae.Uint32(nlAttrIndex, uint32(index))
	}); err != nil {
		return fmt.Errorf("nbd: disconnect %s: %w", DevicePath(index), err)
	}
	if connected, err := k.Status(index); err == nil && connected {
		klog.V(1).InfoS("nbd: device disconnected; still held open, so the kernel keeps its configuration until the last holder closes it", "device", DevicePath(index))
	}
	return nil
}

// Status reports whether device index is connected.
func (k *Kernel) Status(index int) (bool, error) {
	devs, err := k.status(index)
	if err != nil {
		return false, err
	}
	return devs[index], nil
}

// ConnectedDevices lists the indexes of all connected nbd devices.
func (k *Kernel) ConnectedDevices() ([]int, error) {
	devs, err := k.status(-1)
	if err != nil {
		return nil, err
	}
	var out []int
	for i, c := range devs {
		if c {
			out = append(out, i)
		}
	}
	return out, nil
}

func (k *Kernel) status(index int) (map[int]bool, error) {
	msgs, err := k.execute(nlCmdStatus, false, func(ae *netlink.AttributeEncoder) {
		if index >= 0 {
			ae.Uint32(nlAttrIndex, uint32(index))
		}
	})
	if err != nil {
		return nil, fmt.Errorf("nbd: status: %w", err)
	}
	devs := map[int]bool{}
	for _, m := range msgs {
		ad, err := netlink.NewAttributeDecoder(m.Data)
		if err != nil {
			return nil, fmt.Errorf("nbd: status reply: %w", err)
		}
		for ad.Next() {
			if ad.Type() != nlAttrDeviceList {
				continue
			}
			ad.Nested(func(list *netlink.AttributeDecoder) error {
				for list.Next() {
					list.Nested(func(item *netlink.AttributeDecoder) error {
						idx, conn := -1, false
						for item.Next() {
							switch item.Type() {
							case nlDeviceIndex:
								idx = int(item.Uint32())
							case nlDeviceConnected:
								conn = item.Uint8() != 0
							}
						}
						if idx >= 0 {
							devs[idx] = conn
						}
						return nil
					})
				}
				return nil
			})
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("nbd: status reply: %w", err)
		}
	}
	return devs, nil
}

// watchLinkDead delivers LINK_DEAD notifications for device index. When
// the multicast group cannot be joined the channel stays silent and the
// caller's own retries carry on.
func (k *Kernel) watchLinkDead(ctx context.Context, index int) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	events, stop, err := WatchLinkDead(ctx)
	if err != nil {
		klog.V(1).InfoS("nbd: no LINK_DEAD notifications", "err", err)
		return ch, func() {}
	}
	go func() {
		for i := range events {
			if i == index {
				select {
				case ch <- struct{}{}:
				default:
				}
			}
		}
	}()
	return ch, stop
}

// WatchLinkDead subscribes to the kernel's LINK_DEAD multicast, sent when
// the kernel gives up on one of a device's connections. The channel yields
// device indexes until ctx ends or stop is called.
func WatchLinkDead(ctx context.Context) (<-chan int, func(), error) {
	c, err := genetlink.Dial(nil)
	if err != nil {
		return nil, nil, fmt.Errorf("nbd: dial generic netlink: %w", err)
	}
	f, err := c.GetFamily(genlFamily)
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("nbd: generic netlink family %q: %w", genlFamily, err)
	}
	var group uint32
	for _, g := range f.Groups {
		if g.Name == genlMcastName {
			group = g.ID
		}
	}
	if group == 0 {
		c.Close()
		return nil, nil, fmt.Errorf("nbd: no multicast group %q", genlMcastName)
	}
	if err := c.JoinGroup(group); err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("nbd: join %q: %w", genlMcastName, err)
	}
	out := make(chan int)
	var once sync.Once
	stop := func() { once.Do(func() { c.Close() }) }
	go func() {
		<-ctx.Done()
		stop()
	}()
	go func() {
		defer close(out)
		for {
			msgs, _, err := c.Receive()
			if err != nil {
				return
			}
			for _, m := range msgs {
				if m.Header.Command != nlCmdLinkDead {
					continue
				}
				ad, err := netlink.NewAttributeDecoder(m.Data)
				if err != nil {
					continue
				}
				for ad.Next() {
					if ad.Type() == nlAttrIndex {
						select {
						case out <- int(ad.Uint32()):
						case <-ctx.Done():
							return
						}
					}
				}
			}
		}
	}()
	return out, stop, nil
}

// Backends maps each nbd device that has a backend identifier to it, read
// from /sys/block/nbd*/backend (present only while connected).
func Backends() (map[int]string, error) {
	return backendsIn("/sys/block")
}

func backendsIn(sysBlock string) (map[int]string, error) {
	paths, err := filepath.Glob(filepath.Join(sysBlock, "nbd*", "backend"))
	if err != nil {
		return nil, err
	}
	out := map[int]string{}
	for _, p := range paths {
		i, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(filepath.Dir(p)), "nbd"))
		if err != nil {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // disconnected meanwhile
			}
			return nil, fmt.Errorf("nbd: read %s: %w", p, err)
		}
		if id := strings.TrimRight(string(b), "\n"); id != "" {
			out[i] = id
		}
	}
	return out, nil
}

// FindBackend returns the index of the device serving backend id.
func FindBackend(id string) (int, error) {
	bs, err := Backends()
	if err != nil {
		return 0, err
	}
	for i, b := range bs {
		if b == id {
			return i, nil
		}
	}
	return 0, fmt.Errorf("nbd: no device with backend %q: %w", id, os.ErrNotExist)
}

type sockPair struct{ ours, kernel int }

func socketpairs(n int) ([]sockPair, error) {
	var out []sockPair
	for i := 0; i < n; i++ {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeAll(out)
			return nil, fmt.Errorf("nbd: socketpair: %w", err)
		}
		out = append(out, sockPair{ours: fds[0], kernel: fds[1]})
	}
	return out, nil
}

func closeAll(pairs []sockPair) {
	for _, p := range pairs {
		unix.Close(p.ours)
		if p.kernel >= 0 {
			unix.Close(p.kernel)
		}
	}
}
