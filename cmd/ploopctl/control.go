package main

// The control socket lets an operator run snapshot, snapshot-delete, grow
// and compact on a stack that `ploopctl serve` or `ploopctl attach` is serving.
// The serving process holds the stack directory's lock, so the offline
// operations cannot run; instead it listens on DIR/.ploopctl.sock (a unix
// socket, mode 0600, never a network port) and runs them on its open
// stack, pausing I/O only for the metadata switch. The verbs try that
// socket first: if something answers there, the stack is served and the
// request goes to the server; otherwise (no socket, or a stale one left by
// a killed server) they run offline.
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
	"path/filepath"
	"sync"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"k8s.io/klog/v2"
)

// controlName is the control socket's name inside the stack directory.
const controlName = ".ploopctl.sock"

func controlPath(dir string) string { return filepath.Join(dir, controlName) }

type controlRequest struct {
	Op   string `json:"op"` // "snapshot", "snapshot-delete", "grow" or "compact"
	GUID string `json:"guid,omitempty"`
	Size int64  `json:"size,omitempty"`
}

type controlReply struct {
	GUID string `json:"guid,omitempty"`
	Size int64  `json:"size,omitempty"`
	// PauseNS is how long I/O was paused, in nanoseconds.
	PauseNS int64                `json:"pause_ns"`
	Compact *ploop.CompactResult `json:"compact,omitempty"`
	Error   string               `json:"error,omitempty"`
}

// controlServer runs control requests on a served stack.
type controlServer struct {
	stack *ploop.Stack
	// grown, when set, tells the NBD consumer (the kernel device) about a
	// new size.
	grown func(size int64) error
	l     net.Listener
	wg    sync.WaitGroup
}

// startControl listens on the stack directory's control socket.
func startControl(st *ploop.Stack, grown func(int64) error) (*controlServer, error) {
	l, err := nbd.ListenUnix(controlPath(st.Dir()))
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	c := &controlServer{stack: st, grown: grown, l: l}
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
	return c, nil
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
	var req controlRequest
	line, err := bufio.NewReader(nc).ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &req)
	}
	var rep controlReply
	if err == nil {
		rep, err = c.run(req)
	}
	if err != nil {
		rep.Error = err.Error()
	}
	klog.InfoS("control request", "dir", c.stack.Dir(), "op", req.Op, "pause", time.Duration(rep.PauseNS), "err", rep.Error)
	b, _ := json.Marshal(rep)
	nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	nc.Write(append(b, '\n'))
}

func (c *controlServer) run(req controlRequest) (controlReply, error) {
	var rep controlReply
	switch req.Op {
	case "snapshot":
		guid, st, err := c.stack.Snapshot()
		rep.GUID, rep.PauseNS = guid, int64(st.Pause)
		return rep, err
	case "snapshot-delete":
		if !ploop.ValidGUID(req.GUID) {
			return rep, fmt.Errorf("bad GUID %q", req.GUID)
		}
		st, err := c.stack.DeleteSnapshot(req.GUID)
		rep.PauseNS = int64(st.Pause)
		return rep, err
	case "grow":
		st, err := c.stack.Grow(req.Size)
		rep.PauseNS, rep.Size = int64(st.Pause), c.stack.Size()
		if err == nil && c.grown != nil {
			err = c.grown(rep.Size)
		}
		return rep, err
	case "compact":
		res, st, err := c.stack.Compact()
		rep.Compact, rep.PauseNS = &res, int64(st.Pause)
		return rep, err
	default:
		return rep, fmt.Errorf("unknown control op %q", req.Op)
	}
}

// errNotServed says nobody answers on the stack's control socket.
var errNotServed = errors.New("stack is not served")

// controlCall sends req to the process serving the stack in dir. It
// returns errNotServed when no process answers there.
func controlCall(dir string, req controlRequest) (controlReply, error) {
	var rep controlReply
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", controlPath(dir))
	if err != nil {
		return rep, errNotServed
	}
	defer nc.Close()
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	b, err := json.Marshal(req)
	if err != nil {
		return rep, err
	}
	if _, err := nc.Write(append(b, '\n')); err != nil {
		return rep, fmt.Errorf("control socket %s: %w", controlPath(dir), err)
	}
	line, err := bufio.NewReader(nc).ReadBytes('\n')
	if err != nil {
		return rep, fmt.Errorf("control socket %s: %w", controlPath(dir), err)
	}
	if err := json.Unmarshal(line, &rep); err != nil {
		return rep, fmt.Errorf("control socket %s: %w", controlPath(dir), err)
	}
	if rep.Error != "" {
		return rep, fmt.Errorf("served stack %s: %s", dir, rep.Error)
	}
	return rep, nil
}
