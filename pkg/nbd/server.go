package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// ServerOptions bound what clients can make a Server hold. The zero value
// means the defaults, which are safe for a server reachable by untrusted
// local clients.
type ServerOptions struct {
	// HandshakeTimeout bounds negotiation on connections served by
	// ServeConn (and so Serve): a client that has not chosen an export by
	// then is dropped. Default DefaultHandshakeTimeout; negative: no limit.
	HandshakeTimeout time.Duration
	// MaxConns bounds the connections Serve serves at once. Further ones
	// are refused: every option they send is answered with an error
	// (NBD_REP_ERR_POLICY, "too many connections") and they are closed.
	// Connections handed to ServeConn or ServeTransmission by the caller
	// (the kernel's) do not count. Default DefaultMaxConns; negative: no
	// limit.
	MaxConns int
	// MaxConnMemory bounds the request payload bytes one connection holds
	// in buffers: write data read ahead and read data waiting to be sent.
	// At the limit the connection stops reading requests until replies
	// have gone out. A request larger than the limit still runs, once it
	// is the only one holding memory. Reads spliced from the page cache
	// (FileReader) hold pipes, not buffers. Default DefaultMaxConnMemory;
	// negative: no limit.
	MaxConnMemory int64
}

// Defaults of ServerOptions.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultMaxConns         = 16
	// DefaultMaxConnMemory leaves room for two maximal requests, or
	// dozens of the 1-2 MiB ones the kernel and qemu send.
	DefaultMaxConnMemory = 64 << 20
)

func (o ServerOptions) withDefaults() ServerOptions {
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if o.MaxConns == 0 {
		o.MaxConns = DefaultMaxConns
	}
	if o.MaxConnMemory == 0 {
		o.MaxConnMemory = DefaultMaxConnMemory
	}
	return o
}

// Server serves a changing set of exports (Add, Remove), each to any
// number of connections at once. A panic while serving an export fails
// that export only (ErrExportFailed); the others, and the process, carry
// on.
type Server struct {
	opts ServerOptions
	// maxInFlight bounds the requests one connection runs concurrently.
	maxInFlight int
	bufs        bufPool
	// zeros is never written: it is the source of zero bytes for spliced
	// simple replies.
	zeros []byte

	mu       sync.RWMutex
	exports  map[string]*export
	order    []*export // the order of Add; the first is the default
	draining map[string]*export
}

// New returns a server without exports; Add them.
func New(opts ServerOptions) *Server {
	return &Server{
		opts:        opts.withDefaults(),
		maxInFlight: 64,
		zeros:       make([]byte, 64<<10),
		exports:     map[string]*export{},
		draining:    map[string]*export{},
	}
}

// NewServer returns a server with the default options for at least one
// export; the first is the default export.
func NewServer(exports ...Export) (*Server, error) {
	if len(exports) == 0 {
		return nil, errors.New("nbd: no exports")
	}
	s := New(ServerOptions{})
	for _, e := range exports {
		if err := s.Add(e); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Serve accepts connections until ctx is cancelled or the listener fails,
// then closes the listener and every connection and waits for their
// requests to finish. It returns nil after cancellation.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	// Cancelled before the wait, also when Accept fails: that ends the
	// connections, and closes the listener.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	context.AfterFunc(ctx, func() { l.Close() })
	// slots holds one token per connection served; refusals bounds the
	// connections being refused, beyond which they are just closed.
	var slots, refusals chan struct{}
	if s.opts.MaxConns > 0 {
		slots = make(chan struct{}, s.opts.MaxConns)
		refusals = make(chan struct{}, s.opts.MaxConns)
	}
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		if slots != nil {
			select {
			case slots <- struct{}{}:
			default:
				select {
				case refusals <- struct{}{}:
					wg.Add(1)
					go func() {
						defer wg.Done()
						s.refuse(ctx, nc)
						<-refusals
					}()
				default:
					nc.Close()
				}
				continue
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.ServeConn(ctx, nc); err != nil {
				klog.V(2).InfoS("nbd connection ended", "remote", nc.RemoteAddr(), "err", err)
			}
			if slots != nil {
				<-slots
			}
		}()
	}
}

// refuse answers a connection beyond MaxConns: it negotiates just far
// enough to tell the client why, answering every option with
// NBD_REP_ERR_POLICY, and closes it.
func (s *Server) refuse(ctx context.Context, nc net.Conn) {
	c := &conn{srv: s, nc: nc, r: bufio.NewReaderSize(nc, 512), stopped: make(chan struct{})}
	defer c.shutdown()
	stop := context.AfterFunc(ctx, c.shutdown)
	defer stop()
	limit := DefaultHandshakeTimeout
	if t := s.opts.HandshakeTimeout; t > 0 {
		limit = min(limit, t)
	}
	defer c.handshakeDeadline(limit)()
	if _, err := c.greet(); err != nil {
		return
	}
	msg := []byte(fmt.Sprintf("too many connections (this server serves at most %d)", s.opts.MaxConns))
	for {
		opt, _, err := c.readOption(false)
		if err != nil {
			return
		}
		switch opt {
		case optAbort:
			_ = c.optReply(opt, repAck, nil)
			return
		case optExportName:
			return // no error reply exists for this option
		}
		if c.optReply(opt, repErrPolicy, msg) != nil {
			return
		}
	}
}

// ServeConn negotiates with a client (fixed-newstyle handshake) and then
// serves its requests until it disconnects, ctx is cancelled, the export
// is removed or it sends something malformed. The connection is closed
// on return. A clean disconnect, by NBD_CMD_DISC, OPT_ABORT or end of
// stream between messages, returns nil.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) (err error) {
	c := s.newConn(nc)
	defer c.close()
	stop := context.AfterFunc(ctx, c.shutdown)
	defer stop()
	defer c.recoverPanic(&err)
	clearDeadline := c.handshakeDeadline(s.opts.HandshakeTimeout)
	exp, err := c.negotiate()
	if closed := clearDeadline(); closed || errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("nbd: handshake not finished within %v: %w", s.opts.HandshakeTimeout, os.ErrDeadlineExceeded)
	}
	if err != nil || exp == nil {
		return err
	}
	return c.transmit(exp)
}

// ServeTransmission serves an already-negotiated connection, as the
// kernel expects of the sockets it is given: no handshake, simple replies
// only. name selects the export ("" for the default).
//
// The peer is taken to be the kernel, which resends a request that timed
// out on another connection after shutting this one down: a write read
// after that shutdown is dropped, not run (see writeOrder).
func (s *Server) ServeTransmission(ctx context.Context, nc net.Conn, name string) (err error) {
	c := s.newConn(nc)
	c.resends = true
	defer c.close()
	exp := s.lookup(name)
	if exp == nil || !c.use(exp) {
		return fmt.Errorf("nbd: no export %q", name)
	}
	stop := context.AfterFunc(ctx, c.shutdown)
	defer stop()
	defer c.recoverPanic(&err)
	return c.transmit(exp)
}

// conn is the state of one client connection.
type conn struct {
	srv        *Server
	nc         net.Conn
	r          *bufio.Reader
	structured bool
	metaAlloc  bool
	// exp is the export the connection holds (negotiating with it or
	// serving it); set only by the connection's own goroutine, before any
	// worker starts.
	exp *export
	// resends: the peer (the kernel) may resend a request on another
	// connection once it has given up on this one.
	resends bool
	mem     byteBudget

	// stopped is closed by shutdown: whatever waits on behalf of the
	// connection gives up.
	stopped  chan struct{}
	stopOnce sync.Once

	// Replies: wmu guards the queue and whether someone is writing it.
	wmu        sync.Mutex
	writing    bool
	werr       error
	pending    [][]byte
	owned      [][]byte
	marks      []spliceMark
	spareParts [][]byte
	spareOwned [][]byte
	spareMarks []spliceMark

	// raw is the socket's descriptor for splicing replies, nil when the
	// connection has none (then pipes stays disabled).
	raw   syscall.RawConn
	pipes pipePool
}

func (s *Server) newConn(nc net.Conn) *conn {
	c := &conn{srv: s, nc: nc, r: bufio.NewReaderSize(nc, 64<<10), stopped: make(chan struct{})}
	if s.opts.MaxConnMemory > 0 {
		c.mem.max = s.opts.MaxConnMemory
	}
	c.pipes.disabled = true
	if sc, ok := nc.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			c.raw, c.pipes.disabled = rc, false
		}
	}
	return c
}

// shutdown closes the connection, which ends its reader, and makes
// everything waiting on its behalf give up. Any goroutine may call it,
// any number of times.
func (c *conn) shutdown() {
	c.stopOnce.Do(func() {
		close(c.stopped)
		c.nc.Close()
	})
}

// close ends the connection for good, once its requests have finished.
func (c *conn) close() {
	c.shutdown()
	if c.exp != nil {
		c.exp.release(c)
	}
}

// use makes exp the export the connection holds. It fails when exp has
// been removed.
func (c *conn) use(exp *export) bool {
	if c.exp == exp {
		return true
	}
	if c.exp != nil {
		c.exp.release(c)
		c.exp = nil
	}
	if !exp.acquire(c) {
		return false
	}
	c.exp = exp
	return true
}

// recoverPanic turns a panic in the connection's own goroutine into the
// failure of the export it holds.
func (c *conn) recoverPanic(err *error) {
	r := recover()
	if r == nil {
		return
	}
	stack := debug.Stack()
	if c.exp != nil {
		*err = c.exp.fail(r, stack)
		return
	}
	klog.ErrorS(nil, "nbd: panic while negotiating", "panic", fmt.Sprint(r), "stack", string(stack))
	*err = fmt.Errorf("nbd: panic while negotiating: %v", r)
}

// handshakeDeadline limits the handshake to d (no limit when d <= 0). The
// returned function lifts the limit; it reports true when the limit was
// enforced by closing the connection. Otherwise an expired limit shows
// as an error wrapping os.ErrDeadlineExceeded from the handshake's I/O.
func (c *conn) handshakeDeadline(d time.Duration) (clear func() (closed bool)) {
	if d <= 0 {
		return func() bool { return false }
	}
	if err := c.nc.SetDeadline(time.Now().Add(d)); err == nil {
		return func() bool {
			_ = c.nc.SetDeadline(time.Time{})
			return false
		}
	}
	// A connection without deadlines is closed instead.
	t := time.AfterFunc(d, c.shutdown)
	return func() bool { return !t.Stop() }
}

// greet sends the server's greeting and reads the client's flags.
func (c *conn) greet() (noZeroes bool, err error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(hello[:]); err != nil {
		return false, fmt.Errorf("nbd: send greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.r, cf[:]); err != nil {
		return false, fmt.Errorf("nbd: read client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return false, fmt.Errorf("nbd: unknown client flags %#x: %w", clientFlags, errMalformed)
	}
	return clientFlags&flagNoZeroes != 0, nil
}

// errTooBig is an option whose data was skipped because it is too long.
var errTooBig = errors.New("option data too long")

// readOption reads one option. Data longer than maxOptionLen is skipped
// and reported as errTooBig, after which the connection can go on. At a
// clean end of stream it returns io.EOF.
func (c *conn) readOption(skipLong bool) (opt uint32, data []byte, err error) {
	var h [16]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil, io.EOF
		}
		return 0, nil, fmt.Errorf("nbd: read option: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != optMagic {
		return 0, nil, fmt.Errorf("nbd: option magic %#x: %w", m, errMalformed)
	}
	opt = binary.BigEndian.Uint32(h[8:])
	n := binary.BigEndian.Uint32(h[12:])
	if n > maxOptionLen {
		if !skipLong {
			return opt, nil, fmt.Errorf("nbd: option of %d bytes: %w", n, errMalformed)
		}
		if _, err := io.CopyN(io.Discard, c.r, int64(n)); err != nil {
			return opt, nil, fmt.Errorf("nbd: skip option data: %w", err)
		}
		return opt, nil, errTooBig
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(c.r, data); err != nil {
		return opt, nil, fmt.Errorf("nbd: read option data: %w", err)
	}
	return opt, data, nil
}

// negotiate runs the handshake. It returns the export to serve, or nil
// and nil when the client ended negotiation cleanly.
func (c *conn) negotiate() (*export, error) {
	noZeroes, err := c.greet()
	if err != nil {
		return nil, err
	}
	for {
		opt, data, err := c.readOption(true)
		switch {
		case errors.Is(err, errTooBig):
			// The data was skipped, so the connection survives.
			if err := c.optReply(opt, repErrTooBig, []byte(errTooBig.Error())); err != nil {
				return nil, err
			}
			continue
		case errors.Is(err, io.EOF):
			return nil, nil
		case err != nil:
			return nil, err
		}
		exp, done, err := c.option(opt, data, noZeroes)
		if err != nil || done {
			return exp, err
		}
	}
}

// option handles one option. done means negotiation is over: exp is the
// export to serve, or nil when the client aborted.
func (c *conn) option(opt uint32, data []byte, noZeroes bool) (exp *export, done bool, err error) {
	switch opt {
	case optExportName:
		exp := c.srv.lookup(string(data))
		if exp == nil || !c.use(exp) {
			// This option has no error reply: closing is the answer.
			return nil, true, fmt.Errorf("nbd: client asked for unknown export %q", data)
		}
		b := make([]byte, 10, 134)
		binary.BigEndian.PutUint64(b, uint64(exp.Backend.Size()))
		binary.BigEndian.PutUint16(b[8:], exp.transmissionFlags())
		if !noZeroes {
			b = b[:134]
		}
		if _, err := c.nc.Write(b); err != nil {
			return nil, true, fmt.Errorf("nbd: send export: %w", err)
		}
		return exp, true, nil

	case optAbort:
		// Best effort: the client may already have gone.
		_ = c.optReply(opt, repAck, nil)
		return nil, true, nil

	case optList:
		if len(data) != 0 {
			return nil, false, c.optReply(opt, repErrInvalid, []byte("LIST takes no data"))
		}
		for _, e := range c.srv.exportList() {
			b := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
			b = append(b, e.Name...)
			b = append(b, e.Description...)
			if err := c.optReply(opt, repServer, b); err != nil {
				return nil, false, err
			}
		}
		return nil, false, c.optReply(opt, repAck, nil)

	case optInfo, optGo:
		req, perr := parseInfoRequest(data)
		if perr != nil {
			return nil, false, c.optReply(opt, repErrInvalid, []byte(perr.Error()))
		}
		exp := c.srv.lookup(req.name)
		if exp == nil || !c.use(exp) {
			return nil, false, c.optReply(opt, repErrUnknown, []byte("no such export"))
		}
		if err := c.sendInfo(opt, exp, req.infos); err != nil {
			return nil, false, err
		}
		if err := c.optReply(opt, repAck, nil); err != nil {
			return nil, false, err
		}
		return exp, opt == optGo, nil

	case optStructuredReply:
		if len(data) != 0 {
			return nil, false, c.optReply(opt, repErrInvalid, []byte("STRUCTURED_REPLY takes no data"))
		}
		c.structured = true
		return nil, false, c.optReply(opt, repAck, nil)

	case optListMetaContext, optSetMetaContext:
		if !c.structured {
			return nil, false, c.optReply(opt, repErrInvalid, []byte("negotiate structured replies first"))
		}
		req, perr := parseMetaRequest(data)
		if perr != nil {
			return nil, false, c.optReply(opt, repErrInvalid, []byte(perr.Error()))
		}
		if c.srv.lookup(req.name) == nil {
			return nil, false, c.optReply(opt, repErrUnknown, []byte("no such export"))
		}
		match := false
		if opt == optListMetaContext && len(req.queries) == 0 {
			match = true
		}
		for _, q := range req.queries {
			if q == metaContextAllocation || (opt == optListMetaContext && q == "base:") {
				match = true
			}
		}
		if opt == optSetMetaContext {
			c.metaAlloc = match
		}
		if match {
			b := binary.BigEndian.AppendUint32(nil, metaContextAllocationID)
			b = append(b, metaContextAllocation...)
			if err := c.optReply(opt, repMetaContext, b); err != nil {
				return nil, false, err
			}
		}
		return nil, false, c.optReply(opt, repAck, nil)

	default:
		return nil, false, c.optReply(opt, repErrUnsup, []byte("option not supported"))
	}
}

// sendInfo sends NBD_INFO_EXPORT, which is always due, BLOCK_SIZE, which
// we always volunteer, and NAME/DESCRIPTION when asked.
func (c *conn) sendInfo(opt uint32, exp *export, infos []uint16) error {
	b := binary.BigEndian.AppendUint16(nil, infoExport)
	b = binary.BigEndian.AppendUint64(b, uint64(exp.Backend.Size()))
	b = binary.BigEndian.AppendUint16(b, exp.transmissionFlags())
	if err := c.optReply(opt, repInfo, b); err != nil {
		return err
	}
	b = binary.BigEndian.AppendUint16(nil, infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, 1)    // minimum: any byte range works
	b = binary.BigEndian.AppendUint32(b, 4096) // preferred: avoids read-modify-write
	b = binary.BigEndian.AppendUint32(b, MaxPayload)
	if err := c.optReply(opt, repInfo, b); err != nil {
		return err
	}
	for _, typ := range infos {
		var s string
		switch typ {
		case infoName:
			s = exp.Name
		case infoDescription:
			s = exp.Description
		default:
			continue
		}
		b = binary.BigEndian.AppendUint16(nil, typ)
		if err := c.optReply(opt, repInfo, append(b, s...)); err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b, optReplyMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	if _, err := c.nc.Write(append(b, data...)); err != nil {
		return fmt.Errorf("nbd: reply to option %d: %w", opt, err)
	}
	return nil
}

// job is one request handed from the reader to a worker.
type job struct {
	req     request
	payload []byte
	// w orders the request among the export's writes; nil for others.
	w *pendingWrite
}

// transmit reads requests and hands them to a pool of workers (at most
// maxInFlight run at once); replies go out in completion order. Write
// payloads are read here, in order, before the next header, within the
// connection's memory budget. Workers live as long as the connection, so
// their grown stacks are reused.
func (c *conn) transmit(exp *export) error {
	jobs := make(chan job)
	var wg sync.WaitGroup
	defer func() {
		close(jobs)
		wg.Wait()
		c.pipes.closeAll()
	}()
	idle := 0 // see below; only this goroutine spawns workers
	var idleMu sync.Mutex
	worker := func(j job) {
		defer wg.Done()
		for {
			if err := c.serveRequest(exp, j); err != nil {
				// A reply could not be sent, or the kernel gave up on
				// the connection: it is over, and closing it ends the
				// reader too.
				klog.V(2).InfoS("nbd: connection ends", "err", err)
				c.shutdown()
			}
			idleMu.Lock()
			idle++
			idleMu.Unlock()
			var ok bool
			if j, ok = <-jobs; !ok {
				return
			}
		}
	}
	workers := 0
	var hdr [requestSize]byte
	for {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) || c.isStopped() {
				return nil
			}
			return fmt.Errorf("nbd: read request: %w", err)
		}
		req, err := parseRequest(hdr[:])
		if err != nil {
			return fmt.Errorf("nbd: %w", err)
		}
		j := job{req: req}
		switch req.typ {
		case cmdDisc:
			return nil
		case cmdWrite:
			if req.length > MaxPayload {
				// The payload cannot be skipped without trusting the
				// length, so the connection ends here.
				return fmt.Errorf("nbd: write of %d bytes exceeds %d: %w", req.length, MaxPayload, errMalformed)
			}
		}
		if req.typ == cmdWrite || req.typ == cmdTrim || req.typ == cmdWriteZeroes {
			// Ordered on arrival, before anything can delay it further.
			j.w = exp.writes.enter(req.offset, req.length)
		}
		if req.typ == cmdWrite {
			var ok bool
			if j.payload, ok = c.getBuf(int(req.length)); !ok {
				exp.writes.leave(j.w)
				return nil
			}
			if _, err := io.ReadFull(c.r, j.payload); err != nil {
				c.putBuf(j.payload)
				exp.writes.leave(j.w)
				return fmt.Errorf("nbd: read write payload: %w", err)
			}
		}
		idleMu.Lock()
		// idle counts workers about to take a job minus jobs not yet
		// taken, so it stays exact even when the send below has to wait.
		spawn := idle <= 0 && workers < c.srv.maxInFlight
		if !spawn {
			idle--
		}
		idleMu.Unlock()
		if spawn {
			workers++
			wg.Add(1)
			go worker(j)
			continue
		}
		// Blocks while all maxInFlight workers are busy.
		jobs <- j
	}
}

// errPeerGone ends a kernel connection that the kernel has shut down.
var errPeerGone = errors.New("nbd: the kernel shut the connection down; its requests are resent on another one")

func (c *conn) isStopped() bool {
	select {
	case <-c.stopped:
		return true
	default:
		return false
	}
}

// peerGone reports whether the connection is over for the peer: it shut
// the connection down, even while requests it sent before are still
// unread, or we closed it (then no reply can reach it either).
func (c *conn) peerGone() bool {
	if c.isStopped() {
		return true
	}
	if c.raw == nil {
		return false
	}
	gone := false
	if err := c.raw.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(fds, 0); err == nil && n > 0 {
			gone = fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0
		}
	}); err != nil {
		return true // closed meanwhile
	}
	return gone
}

// getBuf takes a pool buffer of n bytes within the connection's memory
// budget, waiting for room. It returns false when the connection is shut
// down first.
func (c *conn) getBuf(n int) ([]byte, bool) {
	if n == 0 {
		return nil, true
	}
	if !c.mem.acquire(c.mem.charge(c.srv.bufs.capFor(n)), c.stopped) {
		return nil, false
	}
	return c.srv.bufs.get(n), true
}

// putBuf returns a buffer from getBuf.
func (c *conn) putBuf(b []byte) {
	if cap(b) == 0 {
		return
	}
	c.srv.bufs.put(b)
	c.mem.release(c.mem.charge(cap(b)))
}

// serveRequest runs one request. A panic in it fails the export (and is
// answered with EIO); the connection and the server go on.
func (c *conn) serveRequest(exp *export, j job) (err error) {
	defer func() {
		if r := recover(); r != nil {
			perr := exp.fail(r, debug.Stack())
			exp.ioError(perr)
			err = c.fail(j.req, errIO, perr.Error())
		}
	}()
	defer exp.writes.leave(j.w)
	return c.handle(exp, j)
}

// handle runs one request and sends its reply.
func (c *conn) handle(exp *export, j job) error {
	req, payload := j.req, j.payload
	defer c.putBuf(payload)
	if c.isStopped() {
		// Shut down (cancelled, removed, broken) with this request still
		// queued: no reply can reach the client, so it is not run.
		return nil
	}
	if err := exp.failed(); err != nil {
		exp.ioError(err)
		return c.fail(req, errIO, err.Error())
	}
	b := exp.Backend
	size := uint64(b.Size())
	inRange := req.offset <= size && uint64(req.length) <= size-req.offset
	if req.flags&^(cmdFlagFUA|cmdFlagNoHole|cmdFlagDF|cmdFlagReqOne|cmdFlagFastZero) != 0 {
		return c.fail(req, errInval, "unknown command flags")
	}
	switch req.typ {
	case cmdRead:
		if req.length > MaxPayload {
			if c.structured {
				return c.fail(req, errOverflow, "read longer than maximum payload")
			}
			return c.fail(req, errInval, "read longer than maximum payload")
		}
		if !inRange {
			return c.fail(req, errInval, "read beyond end of export")
		}
		if fr, ok := b.(FileReader); ok && req.length >= minSplicedRead {
			if done, err := c.readSpliced(exp, fr, req); done {
				return err
			}
		}
		return c.read(exp, b, req)

	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if exp.readOnly() {
			return c.fail(req, errPerm, "read-only export")
		}
		if !inRange {
			if req.typ == cmdTrim {
				return c.fail(req, errInval, "trim beyond end of export")
			}
			return c.fail(req, errNoSpc, "write beyond end of export")
		}
		if !j.w.wait(c.stopped) {
			return nil // nobody is left to answer
		}
		if c.resends && c.peerGone() {
			// The kernel shut this connection down after a request on it
			// timed out, and resends every request it has not seen
			// answered on another one. This copy may have waited (for
			// a worker, for memory, for earlier writes) while the
			// resent one ran and newer writes followed it: running it
			// now could put stale data over them. Checked after the
			// write was ordered, so a copy that passes arrived before
			// any resend and any newer write, which wait for it.
			return errPeerGone
		}
		if err := exp.failed(); err != nil {
			// An earlier overlapping write panicked.
			exp.ioError(err)
			return c.fail(req, errIO, err.Error())
		}
		var err error
		switch req.typ {
		case cmdWrite:
			_, err = b.WriteAt(payload, int64(req.offset))
		case cmdTrim:
			if req.length > 0 {
				err = b.Discard(int64(req.offset), int64(req.length))
			}
		case cmdWriteZeroes:
			noHole := req.flags&cmdFlagNoHole != 0
			if noHole && req.flags&cmdFlagFastZero != 0 {
				// Keeping the range allocated may cost as much as
				// writing it; the client asked us to fail fast then.
				return c.fail(req, errNotSup, "cannot zero quickly while keeping allocation")
			}
			if req.length > 0 {
				err = b.WriteZeroes(int64(req.offset), int64(req.length), noHole)
			}
		}
		if err == nil && req.flags&cmdFlagFUA != 0 {
			err = b.Flush()
		}
		if err != nil {
			klog.V(4).InfoS("nbd request failed", "cmd", req.typ, "offset", req.offset, "length", req.length, "err", err)
			exp.ioError(err)
		}
		return c.done(req, err)

	case cmdFlush:
		err := b.Flush()
		exp.ioError(err)
		return c.done(req, err)

	case cmdBlockStatus:
		if !c.structured || !c.metaAlloc {
			return c.fail(req, errInval, "base:allocation was not negotiated")
		}
		if !inRange || req.length == 0 {
			return c.fail(req, errInval, "block status range outside export")
		}
		return c.blockStatus(b, req)

	default:
		return c.fail(req, errInval, "unknown command")
	}
}

// read answers READ: one simple reply, or with structured replies one
// chunk per data or hole run, so clients can skip zero ranges.
func (c *conn) read(exp *export, b Backend, req request) error {
	buf, ok := c.getBuf(int(req.length))
	if !ok {
		return nil // shut down while waiting for memory: nobody to answer
	}
	// Until the reply owns it, the buffer goes back here, also when the
	// backend panics.
	defer func() { c.putBuf(buf) }()
	if !c.structured {
		if _, err := readFull(b, buf, int64(req.offset)); err != nil {
			exp.ioError(err)
			return c.done(req, err)
		}
		h := simpleHeader(req.handle, 0)
		owned := buf
		buf = nil
		return c.send(owned, h[:], owned)
	}
	runs := extents(b, int64(req.offset), int64(req.length), 0)
	var chunks [][]byte
	for i, r := range runs {
		flags := uint16(0)
		if i == len(runs)-1 {
			flags = replyFlagDone
		}
		if !r.allocated {
			h := chunkHeader(req.handle, flags, replyTypeHole, 12)
			h = binary.BigEndian.AppendUint64(h, uint64(r.off))
			h = binary.BigEndian.AppendUint32(h, uint32(r.n))
			chunks = append(chunks, h)
			continue
		}
		p := buf[r.off-int64(req.offset):][:r.n]
		if _, err := readFull(b, p, r.off); err != nil {
			exp.ioError(err)
			// Chunks already built are dropped: one error chunk is a
			// complete, valid answer.
			return c.structuredError(req, errorCode(err), err.Error())
		}
		h := chunkHeader(req.handle, flags, replyTypeData, 8+uint32(r.n))
		h = binary.BigEndian.AppendUint64(h, uint64(r.off))
		chunks = append(chunks, h, p)
	}
	owned := buf
	buf = nil
	if len(chunks) == 0 { // zero-length read
		return c.send(owned, chunkHeader(req.handle, replyFlagDone, replyTypeNone, 0))
	}
	return c.send(owned, chunks...)
}

// readSpliced answers READ from a FileReader through a pipe (see
// splice.go). It reports false, having sent nothing, when the request must
// be copied instead.
func (c *conn) readSpliced(exp *export, fr FileReader, req request) (bool, error) {
	p := c.pipes.get(int(req.length))
	if p == nil {
		return false, nil
	}
	filling := true
	defer func() {
		if filling {
			// The backend panicked while filling: the pipe holds an
			// unknown part of the reply.
			c.pipes.discard(p)
		}
	}()
	type span struct {
		hole   bool
		off, n int64
	}
	var spans []span
	pos := int64(req.offset)
	err := fr.ReadFile(int64(req.offset), int64(req.length), func(f *os.File, fileOff, n int64) error {
		hole := f == nil && c.structured
		var err error
		switch {
		case f != nil:
			err = p.fillFile(f, fileOff, n, c.srv.zeros)
		case !hole:
			err = p.fillZeros(n, c.srv.zeros)
		}
		if err != nil {
			return err
		}
		if k := len(spans); k > 0 && spans[k-1].hole == hole {
			spans[k-1].n += n
		} else {
			spans = append(spans, span{hole, pos, n})
		}
		pos += n
		return nil
	})
	filling = false
	if err != nil {
		// The pipe may hold part of the reply: it is not reused.
		c.pipes.discard(p)
		var fe *fillError
		switch {
		case errors.Is(err, errPipeFull):
			return false, nil
		case errors.Is(err, errors.ErrUnsupported), errors.As(err, &fe):
			// An O_DIRECT backend, or a filesystem without splice: copy
			// from now on; the copying path reports real I/O errors.
			klog.V(4).InfoS("nbd: reads cannot be spliced; copying instead", "err", err)
			c.pipes.disable()
			return false, nil
		}
		exp.ioError(err)
		return true, c.done(req, err)
	}
	if !c.structured {
		h := simpleHeader(req.handle, 0)
		return true, c.sendWith(nil, []spliceMark{{at: 1, p: p, n: int(req.length), last: true}}, [][]byte{h[:]})
	}
	parts := make([][]byte, 0, len(spans))
	var marks []spliceMark
	for i, s := range spans {
		flags := uint16(0)
		if i == len(spans)-1 {
			flags = replyFlagDone
		}
		if s.hole {
			h := chunkHeader(req.handle, flags, replyTypeHole, 12)
			h = binary.BigEndian.AppendUint64(h, uint64(s.off))
			parts = append(parts, binary.BigEndian.AppendUint32(h, uint32(s.n)))
			continue
		}
		h := chunkHeader(req.handle, flags, replyTypeData, 8+uint32(s.n))
		parts = append(parts, binary.BigEndian.AppendUint64(h, uint64(s.off)))
		marks = append(marks, spliceMark{at: len(parts), p: p, n: int(s.n)})
	}
	if len(marks) == 0 {
		c.pipes.put(p) // all holes
	} else {
		marks[len(marks)-1].last = true
	}
	return true, c.sendWith(nil, marks, parts)
}

// blockStatus answers BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(b Backend, req request) error {
	max := 1024
	if req.flags&cmdFlagReqOne != 0 {
		max = 1
	}
	runs := extents(b, int64(req.offset), int64(req.length), max)
	if len(runs) == 1 && runs[0].err != nil {
		return c.structuredError(req, errorCode(runs[0].err), runs[0].err.Error())
	}
	h := chunkHeader(req.handle, replyFlagDone, replyTypeBlockStat, uint32(4+8*len(runs)))
	h = binary.BigEndian.AppendUint32(h, metaContextAllocationID)
	for _, r := range runs {
		h = binary.BigEndian.AppendUint32(h, uint32(r.n))
		var st uint32
		if !r.allocated {
			st = stateHole | stateZero
		}
		h = binary.BigEndian.AppendUint32(h, st)
	}
	return c.send(nil, h)
}

type run struct {
	off, n    int64
	allocated bool
	err       error
}

// extents splits [off, off+length) into at most max (0: any number of) runs of equal
// allocation, merging neighbours. When the backend cannot tell, the rest
// is reported as allocated, which is always safe.
func extents(b Backend, off, length int64, max int) []run {
	var runs []run
	end := off + length
	for off < end {
		n, alloc, err := b.Extent(off, end-off)
		if err != nil || n <= 0 || n > end-off {
			if len(runs) == 0 && err != nil {
				// Keep the error for BLOCK_STATUS; READ treats the run
				// as data and lets ReadAt report the real failure.
				return []run{{off: off, n: end - off, allocated: true, err: err}}
			}
			n, alloc = end-off, true
		}
		if k := len(runs); k > 0 && runs[k-1].allocated == alloc {
			runs[k-1].n += n
		} else {
			if max > 0 && k == max {
				break
			}
			runs = append(runs, run{off: off, n: n, allocated: alloc})
		}
		off += n
	}
	return runs
}

// readFull reads len(p) bytes; a short read without error is an I/O error
// because the range was checked against the size.
func readFull(b Backend, p []byte, off int64) (int, error) {
	n, err := b.ReadAt(p, off)
	if err == nil && n < len(p) {
		err = io.ErrUnexpectedEOF
	}
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

func simpleHeader(handle uint64, errno uint32) [16]byte {
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], simpleMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], handle)
	return h
}

func chunkHeader(handle uint64, flags, typ uint16, length uint32) []byte {
	h := make([]byte, 20, 20+12)
	binary.BigEndian.PutUint32(h[0:], structuredMagc)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], handle)
	binary.BigEndian.PutUint32(h[16:], length)
	return h
}

// fail answers req with an error: structured (with a message) when
// negotiated, as the protocol wants for READ and prefers for the rest.
func (c *conn) fail(req request, errno uint32, msg string) error {
	if c.structured {
		return c.structuredError(req, errno, msg)
	}
	return c.simpleError(req, errno)
}

// done answers a request without payload: success, or its error mapped.
func (c *conn) done(req request, err error) error {
	if err == nil {
		return c.simpleError(req, 0)
	}
	return c.fail(req, errorCode(err), err.Error())
}

func (c *conn) simpleError(req request, errno uint32) error {
	h := simpleHeader(req.handle, errno)
	return c.send(nil, h[:])
}

func (c *conn) structuredError(req request, errno uint32, msg string) error {
	if len(msg) > 256 {
		msg = strings.ToValidUTF8(msg[:256], "")
	}
	h := chunkHeader(req.handle, replyFlagDone, replyTypeError, uint32(6+len(msg)))
	h = binary.BigEndian.AppendUint32(h, errno)
	h = binary.BigEndian.AppendUint16(h, uint16(len(msg)))
	return c.send(nil, append(h, msg...))
}

// send queues one whole reply; replies of concurrent requests never
// interleave. The first sender to find no write in progress becomes the
// writer and sends everything queued meanwhile in one writev, so a busy
// connection needs far fewer syscalls than replies. owned, if not nil, is
// a pool buffer referenced by parts that goes back to the pool once sent.
func (c *conn) send(owned []byte, parts ...[]byte) error {
	return c.sendWith(owned, nil, parts)
}

// sendWith is send for a reply that also carries pipe data: marks (with
// at relative to parts) say where it goes.
func (c *conn) sendWith(owned []byte, marks []spliceMark, parts [][]byte) error {
	c.wmu.Lock()
	if c.werr != nil {
		err := c.werr
		c.wmu.Unlock()
		c.putBuf(owned)
		c.dropMarks(marks)
		return err
	}
	base := len(c.pending)
	c.pending = append(c.pending, parts...)
	for _, m := range marks {
		m.at += base
		c.marks = append(c.marks, m)
	}
	if owned != nil {
		c.owned = append(c.owned, owned)
	}
	if c.writing {
		c.wmu.Unlock()
		return nil
	}
	c.writing = true
	var err error
	for len(c.pending) > 0 && err == nil {
		batch, owned, marks := c.pending, c.owned, c.marks
		c.pending, c.owned, c.marks = c.spareParts[:0], c.spareOwned[:0], c.spareMarks[:0]
		c.wmu.Unlock()
		err = c.writeOutSafe(batch, marks)
		for i, b := range owned {
			c.putBuf(b)
			owned[i] = nil
		}
		clear(marks)
		c.wmu.Lock()
		c.spareParts, c.spareOwned, c.spareMarks = clearParts(batch[:0:cap(batch)]), owned[:0], marks[:0]
	}
	if err != nil {
		c.werr = fmt.Errorf("nbd: send reply: %w", err)
		err = c.werr
		for _, b := range c.owned {
			c.putBuf(b)
		}
		c.dropMarks(c.marks)
		c.pending, c.owned, c.marks = nil, nil, nil
	}
	c.writing = false
	c.wmu.Unlock()
	return err
}

// writeOutSafe is writeOut, with a panic turned into the failure of the
// export and an error that ends the connection: the reply stream is in
// an unknown state. Pipes of the batch are left to leak rather than
// risk closing one that went back to the pool.
func (c *conn) writeOutSafe(parts [][]byte, marks []spliceMark) (err error) {
	defer func() {
		if r := recover(); r != nil {
			stack := debug.Stack()
			if c.exp == nil {
				klog.ErrorS(nil, "nbd: panic while sending replies", "panic", fmt.Sprint(r), "stack", string(stack))
				err = fmt.Errorf("nbd: panic while sending replies: %v", r)
				return
			}
			err = c.exp.fail(r, stack)
		}
	}()
	return c.writeOut(parts, marks)
}

// writeOut writes a batch of replies: the byte parts with writev, the
// pipe data with splice, in order. Pipes go back to the pool once empty;
// after a failure the ones not emptied are closed.
func (c *conn) writeOut(parts [][]byte, marks []spliceMark) error {
	start := 0
	for i, m := range marks {
		if m.at > start {
			bufs := net.Buffers(parts[start:m.at])
			if _, err := bufs.WriteTo(c.nc); err != nil {
				c.dropMarks(marks[i:])
				return err
			}
			start = m.at
		}
		if err := m.p.drainTo(c.raw, m.n); err != nil {
			c.dropMarks(marks[i:])
			return err
		}
		if m.last {
			c.pipes.put(m.p)
		}
	}
	if start < len(parts) {
		bufs := net.Buffers(parts[start:])
		if _, err := bufs.WriteTo(c.nc); err != nil {
			return err
		}
	}
	return nil
}

// dropMarks closes the pipes of replies that will not be sent.
func (c *conn) dropMarks(marks []spliceMark) {
	for _, m := range marks {
		if m.last {
			c.pipes.discard(m.p)
		}
	}
}

// clearParts drops references so the spare slice does not pin buffers.
func clearParts(b net.Buffers) [][]byte {
	b = b[:cap(b)]
	clear(b)
	return b[:0]
}

// bufPool recycles request buffers in power-of-two classes from 4 KiB to
// MaxPayload, so large reads and writes do not churn the heap.
type bufPool struct {
	classes [14]sync.Pool // 4 KiB << i
}

func (p *bufPool) class(n int) int {
	i, size := 0, 4096
	for size < n {
		size <<= 1
		i++
	}
	return i
}

// capFor is the capacity of the buffer get(n) returns.
func (p *bufPool) capFor(n int) int { return 4096 << p.class(n) }

func (p *bufPool) get(n int) []byte {
	if n == 0 {
		return nil
	}
	i := p.class(n)
	if v := p.classes[i].Get(); v != nil {
		return (*(v.(*[]byte)))[:n]
	}
	return make([]byte, n, 4096<<i)
}

func (p *bufPool) put(b []byte) {
	if cap(b) < 4096 {
		return
	}
	i := p.class(cap(b))
	if i >= len(p.classes) || 4096<<i != cap(b) {
		return
	}
	b = b[:cap(b)]
	p.classes[i].Put(&b)
}
