package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// serveWith serves one memBackend export with opts on a unix socket.
func serveWith(t *testing.T, opts ServerOptions) (*Server, string) {
	t.Helper()
	srv := New(opts)
	if err := srv.Add(Export{Name: "x", Backend: &memBackend{data: make([]byte, 1<<20)}}); err != nil {
		t.Fatal(err)
	}
	return srv, serveServer(t, srv)
}

// expectDropped waits (up to 20 s) for the server to close c.
func expectDropped(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the server kept the connection open")
	}
}

// TestHandshakeTimeout: a client that does not finish negotiating within
// the limit is dropped, wherever it stalls; one that finished may idle.
func TestHandshakeTimeout(t *testing.T) {
	const limit = 100 * time.Millisecond
	_, sock := serveWith(t, ServerOptions{HandshakeTimeout: limit})
	tests := []struct {
		name string
		send []byte
	}{
		{"silent", nil},
		{"flags only", binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)},
		{"half an option", append(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes), optBytes(optGo, goData("x"))[:10]...)},
		{"options without GO", append(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes), optBytes(optStructuredReply, nil)...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			expectDropped(t, c)
			if d := time.Since(start); d < limit/2 {
				t.Errorf("dropped after %v, before the %v limit", d, limit)
			}
		})
	}
	t.Run("negotiated client may idle", func(t *testing.T) {
		rc := dialRaw(t, sock)
		rc.goExport("x")
		// Idle well past the handshake limit: the property under test.
		<-time.After(5 * limit)
		rc.writeRead(1, 0, 0x5a)
	})
}

// TestMaxConns: with the default options, connection N+1 is refused,
// in a way a real client reports; once a slot is free, a client gets in
// again.
func TestMaxConns(t *testing.T) {
	testcmd.Need(t, "nbdinfo")
	const max = DefaultMaxConns
	srv, err := NewServer(Export{Name: "x", Backend: &memBackend{data: make([]byte, 1<<20)}})
	if err != nil {
		t.Fatal(err)
	}
	sock := serveServer(t, srv)
	var held []*rawClient
	for i := 0; i < max; i++ {
		rc := dialRaw(t, sock)
		rc.goExport("x")
		held = append(held, rc)
	}
	// libnbd reports NBD_REP_ERR_POLICY as such (the server's message
	// shows with LIBNBD_DEBUG=1).
	out, ok := runQuiet("nbdinfo", "--size", nbdURI(sock, "x"))
	if ok || !strings.Contains(out, "policy") {
		t.Fatalf("connection %d was not refused by policy:\n%s", max+1, out)
	}
	// The refusal is an orderly one, with a reason; OPT_ABORT is
	// acknowledged.
	rc := dialRaw(t, sock)
	if types, msgs := rc.option(optGo, goData("x")); types[0] != repErrPolicy || !strings.Contains(string(msgs[0]), "too many connections") {
		t.Errorf("OPT_GO beyond the cap answered %v %q, want NBD_REP_ERR_POLICY, too many connections", types, msgs)
	}
	if types, _ := rc.option(optAbort, nil); types[0] != repAck {
		t.Errorf("OPT_ABORT answered %v", types)
	}
	// Those held still work.
	held[0].writeRead(1, 0, 0x11)
	held[max-1].request(cmdDisc, 0, 0, 0, 0, nil)
	expectDropped(t, held[max-1].c)
	waitFor(t, "a slot is free again", func() bool {
		_, ok := runQuiet("nbdinfo", "--size", nbdURI(sock, "x"))
		return ok
	})
}

// memConn finds the one connection holding export name.
func memConn(t *testing.T, srv *Server, name string) *conn {
	t.Helper()
	var c *conn
	waitFor(t, "the connection holds the export", func() bool {
		e := srv.lookup(name)
		e.mu.Lock()
		defer e.mu.Unlock()
		for u := range e.users {
			c = u
		}
		return c != nil
	})
	return c
}

// readGateBackend is a gateBackend whose reads at gateOff and beyond
// block too.
type readGateBackend struct{ *gateBackend }

func (g readGateBackend) ReadAt(p []byte, off int64) (int, error) {
	if g.gated(off) {
		g.entered.Add(1)
		<-g.gate
		defer g.returned.Add(1)
	}
	return g.memBackend.ReadAt(p, off)
}

// TestConnMemoryBounded: with a backend that holds every request, a
// connection flooded with large writes or reads holds at most
// MaxConnMemory of buffers; its reader (or its workers) wait instead of
// failing, and everything completes once the backend lets go. Without
// the cap, all 32 MiB would be buffered at once.
func TestConnMemoryBounded(t *testing.T) {
	const (
		limit = 8 << 20
		size  = 1 << 20
		n     = 32
	)
	for _, typ := range []uint16{cmdWrite, cmdRead} {
		name := map[uint16]string{cmdWrite: "write", cmdRead: "read"}[typ]
		t.Run(name, func(t *testing.T) {
			g := newGateBackend(2*n*size, 0)
			srv := New(ServerOptions{MaxConnMemory: limit})
			if err := srv.Add(Export{Name: "x", Backend: readGateBackend{g}}); err != nil {
				t.Fatal(err)
			}
			client, server := socketpair(t)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- srv.ServeTransmission(ctx, server, "x") }()
			rc := &rawClient{t: t, c: client}
			sent := make(chan struct{})
			go func() {
				defer close(sent)
				for i := 0; i < n; i++ {
					var payload []byte
					if typ == cmdWrite {
						payload = bytes.Repeat([]byte{byte(i + 1)}, size)
					}
					b := reqBytes(typ, 0, uint64(i)*size, size, payload)
					binary.BigEndian.PutUint64(b[8:], uint64(i))
					if _, err := client.Write(b); err != nil {
						return
					}
				}
			}()
			c := memConn(t, srv, "x")
			// Reads take their buffer before entering the backend, so
			// wait for both: memory is short, and what holds it entered.
			waitFor(t, "requests wait for memory", func() bool {
				_, _, waiting := c.mem.state()
				return waiting > 0 && g.entered.Load() >= limit/size
			})
			used, _, _ := c.mem.state()
			if in := g.entered.Load(); in != limit/size || used != limit {
				t.Errorf("while memory is short: %d requests in the backend holding %d bytes; want %d holding %d", in, used, limit/size, limit)
			}
			close(g.gate)
			for i := 0; i < n; i++ {
				h, e := rc.simpleReply()
				if e != 0 || h >= n {
					t.Fatalf("reply: handle %d error %d", h, e)
				}
				if typ == cmdRead {
					rc.read(make([]byte, size))
				}
			}
			<-sent
			if _, peak, _ := c.mem.state(); peak > limit {
				t.Errorf("peak buffered %d bytes, over the %d limit", peak, limit)
			}
			if typ == cmdWrite {
				got := make([]byte, size)
				for i := 0; i < n; i++ {
					g.ReadAt(got, int64(i)*size)
					if !bytes.Equal(got, bytes.Repeat([]byte{byte(i + 1)}, size)) {
						t.Fatalf("write %d did not land", i)
					}
				}
			}
			client.Close()
			if err := <-done; err != nil {
				t.Errorf("ServeTransmission: %v", err)
			}
		})
	}

	t.Run("request larger than the limit", func(t *testing.T) {
		b := &memBackend{data: make([]byte, 4*limit)}
		srv := New(ServerOptions{MaxConnMemory: limit})
		if err := srv.Add(Export{Name: "x", Backend: b}); err != nil {
			t.Fatal(err)
		}
		a, s := net.Pipe()
		rc := startRawClient(t, srv, a, s)
		rc.goExport("x")
		data := bytes.Repeat([]byte{0xa5}, 3*limit)
		rc.request(cmdWrite, 0, 1, 4096, uint32(len(data)), data)
		if h, e := rc.simpleReply(); h != 1 || e != 0 {
			t.Fatalf("large write: handle %d error %d", h, e)
		}
		rc.request(cmdRead, 0, 2, 4096, uint32(len(data)), nil)
		if h, e := rc.simpleReply(); h != 2 || e != 0 {
			t.Fatalf("large read: handle %d error %d", h, e)
		}
		got := make([]byte, len(data))
		rc.read(got)
		if !bytes.Equal(got, data) {
			t.Fatal("large read returned other data")
		}
	})
}
