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
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"golang.org/x/sys/unix"
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

// maxRequest bounds a request line, newline included. Real requests are
// under 200 bytes; the bound keeps a client from making the server buffer
// an endless line.
const maxRequest = 4096

// maxReply bounds a reply line for the client, for the same reason.
const maxReply = 64 << 10

// ioTimeout bounds reading a request and writing a reply, so that a client
// that connects and stalls does not keep a handler forever.
const ioTimeout = 10 * time.Second

// errRequestTooLong refuses a request line longer than maxRequest.
var errRequestTooLong = fmt.Errorf("control request longer than %d bytes", maxRequest)

// controlServer answers control requests for one volume.
type controlServer struct {
	v *Volume
	l *ownedListener
	// uid is the serving process's user, which may use the socket besides
	// root.
	uid uint32
	wg  sync.WaitGroup
}

// ServeControl starts answering control requests for the volume on a unix
// socket at path (mode 0600); "" means ControlPath of the stack directory.
// Only root and this process's uid are answered. The socket stops with
// Close or Release, which remove it unless a successor has bound the path
// since.
func (v *Volume) ServeControl(path string) error {
	if path == "" {
		path = ControlPath(v.path)
	}
	done, err := v.begin("control socket for")
	if err != nil {
		return err
	}
	defer done()
	if v.stack == nil || v.readOnly {
		return fmt.Errorf("control socket for %s: %w", v.path, ErrNotStack)
	}
	if v.ctl != nil {
		return fmt.Errorf("control socket for %s: already serving", v.path)
	}
	l, err := listenOwned(path)
	if err != nil {
		return fmt.Errorf("control socket for %s: %w", v.path, err)
	}
	c := &controlServer{v: v, l: l, uid: uint32(os.Getuid())}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			nc, err := l.AcceptUnix()
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
	v.mu.Lock()
	closing := v.closed
	if !closing {
		v.ctl = c
	}
	v.mu.Unlock()
	if closing {
		// A teardown that began meanwhile did not see this server.
		c.Close()
		return fmt.Errorf("control socket for %s: %w", v.path, os.ErrClosed)
	}
	klog.V(1).InfoS("serving: control socket", "dir", v.path, "socket", path)
	return nil
}

// Close stops accepting requests, waits for those running and removes the
// socket if it is still ours.
func (c *controlServer) Close() error {
	err := c.l.Close()
	c.wg.Wait()
	if err != nil {
		return fmt.Errorf("control socket %s: %w", c.l.path, err)
	}
	return nil
}

// peerAllowed says whether a client with uid peer may use the control
// socket of a server running as uid self. The 0600 socket already keeps
// others out; this holds when its mode or directory does not.
func peerAllowed(peer, self uint32) bool { return peer == 0 || peer == self }

// peerUID is the uid of the process at the other end of nc, as the kernel
// recorded it at connect.
func peerUID(nc *net.UnixConn) (uint32, error) {
	raw, err := nc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return cred.Uid, nil
}

func (c *controlServer) handle(nc *net.UnixConn) {
	defer nc.Close()
	var req Request
	var rep Reply
	uid, err := peerUID(nc)
	if err == nil && !peerAllowed(uid, c.uid) {
		err = fmt.Errorf("uid %d is not allowed to use this control socket: %w", uid, os.ErrPermission)
	}
	if err == nil {
		nc.SetReadDeadline(time.Now().Add(ioTimeout))
		req, err = readRequest(nc)
	}
	if err == nil {
		rep, err = c.run(req)
	}
	if err != nil {
		rep.Error = err.Error()
	}
	klog.InfoS("serving: control request", "dir", c.v.path, "peerUID", uid, "op", req.Op, "pause", rep.Pause(), "err", rep.Error)
	b, _ := json.Marshal(rep)
	nc.SetWriteDeadline(time.Now().Add(ioTimeout))
	nc.Write(append(b, '\n'))
}

// readLine reads one newline-terminated line of at most max bytes,
// newline included, without reading further than max+1 bytes.
func readLine(r io.Reader, max int, tooLong error) ([]byte, error) {
	line, err := bufio.NewReaderSize(io.LimitReader(r, int64(max)+1), 512).ReadBytes('\n')
	switch {
	case len(line) > max:
		return nil, tooLong
	case errors.Is(err, io.EOF):
		return nil, fmt.Errorf("incomplete line (%d bytes, no newline)", len(line))
	case err != nil:
		return nil, err
	}
	return line, nil
}

// readRequest reads and checks one request line.
func readRequest(r io.Reader) (Request, error) {
	line, err := readLine(r, maxRequest, errRequestTooLong)
	if err != nil {
		return Request{}, fmt.Errorf("read control request: %w", err)
	}
	return parseRequest(line)
}

// parseRequest decodes a request line strictly: unknown fields are
// errors, so that a client newer than the server is told instead of
// having part of its request ignored.
func parseRequest(line []byte) (Request, error) {
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return req, fmt.Errorf("decode control request: %w", err)
	}
	if dec.More() {
		return req, errors.New("decode control request: more than one value")
	}
	switch req.Op {
	case OpSnapshot, OpCompact:
	case OpSnapshotDelete:
		if !ploop.ValidGUID(req.GUID) {
			return req, fmt.Errorf("control request %s: bad GUID %q", req.Op, req.GUID)
		}
	case OpGrow:
		if req.Size <= 0 {
			return req, fmt.Errorf("control request %s: size %d must be positive", req.Op, req.Size)
		}
	default:
		return req, fmt.Errorf("unknown control op %q", req.Op)
	}
	return req, nil
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
// ControlPath) and returns its reply. It returns an error wrapping
// ErrNotServed when there is no socket or nobody listens on it, and the
// server's error when the request failed.
func Call(ctx context.Context, path string, req Request) (Reply, error) {
	var rep Reply
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	switch {
	case errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR):
		// No socket, or one whose server is gone.
		return rep, fmt.Errorf("control socket %s: %w", path, ErrNotServed)
	case err != nil:
		// Served, but not reachable by this caller (EACCES): running
		// offline instead would only fail on the stack's lock.
		return rep, fmt.Errorf("control socket %s: %w", path, err)
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
	_, werr := nc.Write(append(b, '\n'))
	// A server that refuses a client (peer credentials) replies and
	// hangs up without reading, so the write may fail with the reply
	// already waiting: read it either way.
	line, err := readLine(nc, maxReply, fmt.Errorf("control reply longer than %d bytes", maxReply))
	if err != nil {
		if werr != nil {
			err = werr
		}
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
