package nbd

import (
	"bytes"
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// kernelConn serves one export to a socketpair the way an Attachment
// does, and returns the client ("kernel") end and a channel closed when
// ServeTransmission has returned.
func kernelConn(t *testing.T, srv *Server, name string) (*rawClient, <-chan struct{}) {
	t.Helper()
	client, server := socketpair(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		srv.ServeTransmission(ctx, server, name)
	}()
	t.Cleanup(func() { cancel(); client.Close(); <-ended })
	client.SetDeadline(time.Now().Add(time.Minute))
	return &rawClient{t: t, c: client}, ended
}

// hangUp does what the kernel does to a connection it gives up on:
// shutdown, not close.
func hangUp(t *testing.T, rc *rawClient) {
	t.Helper()
	uc := rc.c.(*net.UnixConn)
	if err := uc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := uc.CloseRead(); err != nil {
		t.Fatal(err)
	}
}

// firstWriteGate holds the first write at offset 0 until gate is closed.
type firstWriteGate struct {
	memBackend
	first        atomic.Bool
	gate         chan struct{}
	held, landed chan struct{}
}

func (g *firstWriteGate) WriteAt(p []byte, off int64) (int, error) {
	if off == 0 && g.first.CompareAndSwap(false, true) {
		close(g.held)
		<-g.gate
		defer close(g.landed)
	}
	return g.memBackend.WriteAt(p, off)
}

// TestResentWriteCannotLandLate replays what the kernel does when a
// write times out: it shuts the connection down and resends the write on
// another one, while the first copy is still running in the server. The
// filesystem then writes newer data to the same block. The first copy,
// when it finally runs, must not overwrite the newer data.
func TestResentWriteCannotLandLate(t *testing.T) {
	g := &firstWriteGate{memBackend: memBackend{data: make([]byte, 1<<20)},
		gate: make(chan struct{}), held: make(chan struct{}), landed: make(chan struct{})}
	srv := New(ServerOptions{})
	if err := srv.Add(Export{Name: "x", Backend: g}); err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte{'A'}, 4096)
	newer := bytes.Repeat([]byte{'B'}, 4096)
	c1, _ := kernelConn(t, srv, "x")
	c2, _ := kernelConn(t, srv, "x")
	c1.request(cmdWrite, 0, 1, 0, 4096, old)
	<-g.held // the first copy is running, and slow
	hangUp(t, c1)
	c2.request(cmdWrite, 0, 2, 0, 4096, old)   // the resent copy
	c2.request(cmdWrite, 0, 3, 0, 4096, newer) // the filesystem's next write
	exp := srv.lookup("x")
	waitFor(t, "both writes on the second connection arrived", func() bool {
		exp.writes.mu.Lock()
		defer exp.writes.mu.Unlock()
		return len(exp.writes.active) == 3
	})
	close(g.gate)
	for i := 0; i < 2; i++ {
		if h, e := c2.simpleReply(); (h != 2 && h != 3) || e != 0 {
			t.Fatalf("reply: handle %d error %d", h, e)
		}
	}
	<-g.landed
	got := make([]byte, 4096)
	g.ReadAt(got, 0)
	if !bytes.Equal(got, newer) {
		t.Fatalf("block 0 holds %q..., want the newer %q...: a stale copy landed last", got[:4], newer[:4])
	}
}

// TestWriteAfterHangUpIsDropped: a write that the server reads, or gets
// round to, only after the kernel shut its connection down is never run:
// the kernel resends it elsewhere, and newer writes may already have
// followed. Here it waits for a worker behind 64 slow writes.
func TestWriteAfterHangUpIsDropped(t *testing.T) {
	const busy = 64
	g := newGateBackend(1<<20, 0)
	g.gateEnd = busy * 4096
	srv, err := NewServer(Export{Name: "x", Backend: g})
	if err != nil {
		t.Fatal(err)
	}
	c, done := kernelConn(t, srv, "x")
	var stream []byte
	for i := 0; i <= busy; i++ {
		stream = append(stream, reqBytes(cmdWrite, 0, uint64(i)*4096, 4096, bytes.Repeat([]byte{0xee}, 4096))...)
	}
	c.write(stream)
	waitFor(t, "every worker is busy", func() bool { return g.entered.Load() == busy })
	hangUp(t, c)
	close(g.gate)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("ServeTransmission did not end after the hang-up")
	}
	got := make([]byte, 1)
	g.ReadAt(got, busy*4096)
	if g.entered.Load() != busy || got[0] != 0 {
		t.Fatalf("the write queued behind the busy workers ran after the hang-up (%d writes reached the backend)", g.entered.Load())
	}
}

// TestWriteOrder checks the ordering rules directly: overlapping writes
// wait for earlier ones, others do not, and stop ends a wait.
func TestWriteOrder(t *testing.T) {
	var o writeOrder
	a := o.enter(0, 8192)
	b := o.enter(4096, 8192) // overlaps a
	c := o.enter(16384, 4096)
	if o.enter(0, 0) != nil {
		t.Error("a zero-length write was ordered")
	}
	huge := o.enter(1<<64-4096, 1<<31) // wraps: clamped, overlaps nothing
	if !c.wait(nil) || !huge.wait(nil) || !a.wait(nil) {
		t.Fatal("a write without earlier overlapping ones waited")
	}
	stop := make(chan struct{})
	close(stop)
	if b.wait(stop) {
		t.Fatal("b did not wait for a")
	}
	waited := make(chan bool)
	go func() { waited <- b.wait(nil) }()
	o.leave(a)
	if !<-waited {
		t.Fatal("b's wait failed")
	}
	for _, w := range []*pendingWrite{b, c, huge} {
		o.leave(w)
	}
	o.leave(nil)
	if len(o.active) != 0 {
		t.Fatalf("%d writes left", len(o.active))
	}
}
