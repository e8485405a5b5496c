package serving

// The control socket lets other processes (ploopctl snapshot, grow, ...)
// run the online operations on a stack this process serves. The serving
// process holds the stack directory's lock, so the offline operations
// cannot run; the verbs try the control socket first, and if something
// answers there, the request runs here on the open stack.
//
// The protocol is one JSON request line and one JSON reply line per
// connection.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"k8s.io/klog/v2"
)

// Op names a control request.
type Op string

// The control operations.
const (
	OpSnapshot       Op = "snapshot"
	OpSnapshotDelete Op = "snapshot-delete"
	OpGrow           Op = "grow"
	OpCompact        Op = "compact"
)

// Request is one control request.
type Request struct {
	Op   Op     `json:"op"`
	GUID string `json:"guid,omitempty"` // OpSnapshotDelete: the snapshot
	Size int64  `json:"size,omitempty"` // OpGrow: the new size in bytes
}

// Reply is the answer to one control request.
type Reply struct {
	GUID string `json:"guid,omitempty"` // OpSnapshot: the new snapshot
	Size int64  `json:"size,omitempty"` // OpGrow: the size after growing
	// PauseNS is how long I/O was paused, in nanoseconds.
	PauseNS int64                `json:"pause_ns"`
	Compact *ploop.CompactResult `json:"compact,omitempty"`
	Error   string               `json:"error,omitempty"`
}

// Pause is how long the operation paused I/O.
func (r Reply) Pause() time.Duration { return time.Duration(r.PauseNS) }

// controlServer answers control requests for one volume.
type controlServer struct {
	v  *Volume
	l  net.Listener
	wg sync.WaitGroup
}

// ServeControl starts answering control requests for the volume on a unix
// socket at path; "" means ControlPath of the stack directory. The socket
// stops with Close or Release.
func (v *Volume) ServeControl(path string) error {
	if path == "" {
		path = ControlPath(v.path)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.stack == nil || v.readOnly {
		return fmt.Errorf("control socket for %s: %w", v.path, ErrNotStack)
	}
	if v.ctl != nil {
		return fmt.Errorf("control socket for %s: already serving", v.path)
	}
	l, err := nbd.ListenUnix(path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	c := &controlServer{v: v, l: l}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				c.handle(nc)
			}()
		}
	}()
	v.ctl = c
	return nil
}

// Close stops accepting requests, waits for those running and removes the
// socket.
func (c *controlServer) Close() error {
	err := c.l.Close()
	c.wg.Wait()
	return err
}

func (c *controlServer) handle(nc net.Conn) {
	defer nc.Close()
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	var req Request
	line, err := bufio.NewReader(nc).ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &req)
	}
	var rep Reply
	if err == nil {
		rep, err = c.run(req)
	}
	if err != nil {
		rep.Error = err.Error()
	}
	klog.InfoS("control request", "dir", c.v.path, "op", req.Op, "pause", rep.Pause(), "err", rep.Error)
	b, _ := json.Marshal(rep)
	nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	nc.Write(append(b, '\n'))
}

func (c *controlServer) run(req Request) (Reply, error) {
	var rep Reply
	switch req.Op {
	case OpSnapshot:
		guid, st, err := c.v.Snapshot()
		rep.GUID, rep.PauseNS = guid, int64(st.Pause)
		return rep, err
	case OpSnapshotDelete:
		st, err := c.v.DeleteSnapshot(req.GUID)
		rep.PauseNS = int64(st.Pause)
		return rep, err
	case OpGrow:
		st, err := c.v.Grow(req.Size)
		rep.PauseNS, rep.Size = int64(st.Pause), c.v.Size()
		return rep, err
	case OpCompact:
		res, st, err := c.v.Compact()
		rep.Compact, rep.PauseNS = &res, int64(st.Pause)
		return rep, err
	default:
		return rep, fmt.Errorf("unknown control op %q", req.Op)
	}
}

// ErrNotServed says nobody answers on the control socket: the stack is not
// served, or its server was killed and left a stale socket.
var ErrNotServed = errors.New("stack is not served")

// Call sends req to the process serving the control socket at path (see
// ControlPath) and returns its reply. It returns ErrNotServed when no
// process answers there, and the server's error when the request failed.
func Call(ctx context.Context, path string, req Request) (Reply, error) {
	var rep Reply
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return rep, fmt.Errorf("control socket %s: %w", path, ErrNotServed)
	}
	defer nc.Close()
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	defer stop()
	b, err := json.Marshal(req)
	if err != nil {
		return rep, err
	}
	if _, err := nc.Write(append(b, '\n')); err != nil {
		return rep, fmt.Errorf("control socket %s: %w", path, err)
	}
	line, err := bufio.NewReader(nc).ReadBytes('\n')
	if err != nil {
		return rep, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := json.Unmarshal(line, &rep); err != nil {
		return rep, fmt.Errorf("control socket %s: %w", path, err)
	}
	if rep.Error != "" {
		return rep, fmt.Errorf("control socket %s: %s", path, rep.Error)
	}
	return rep, nil
}
