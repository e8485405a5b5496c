package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// panickyBackend panics once in the method named by trip, when armed.
type panickyBackend struct {
	*splicingBackend
	trip  string
	armed atomic.Bool
}

func (p *panickyBackend) check(method string) {
	if method == p.trip && p.armed.CompareAndSwap(true, false) {
		panic(fmt.Sprintf("injected panic in %s", method))
	}
}

func (p *panickyBackend) Size() int64 { p.check("Size"); return p.splicingBackend.Size() }
func (p *panickyBackend) ReadAt(b []byte, off int64) (int, error) {
	p.check("ReadAt")
	return p.splicingBackend.ReadAt(b, off)
}
func (p *panickyBackend) WriteAt(b []byte, off int64) (int, error) {
	p.check("WriteAt")
	return p.splicingBackend.WriteAt(b, off)
}
func (p *panickyBackend) Flush() error { p.check("Flush"); return p.splicingBackend.Flush() }
func (p *panickyBackend) Discard(off, n int64) error {
	p.check("Discard")
	return p.splicingBackend.Discard(off, n)
}
func (p *panickyBackend) Extent(off, n int64) (int64, bool, error) {
	p.check("Extent")
	return p.splicingBackend.Extent(off, n)
}
func (p *panickyBackend) ReadFile(off, n int64, piece func(*os.File, int64, int64) error) error {
	return p.splicingBackend.ReadFile(off, n, func(f *os.File, fo, k int64) error {
		// Inside the fill, with a pipe of the connection half full.
		p.check("ReadFile")
		return piece(f, fo, k)
	})
}

// serveServer serves srv on a fresh unix socket until the test ends.
func serveServer(t testing.TB, srv *Server) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock
}

// dialRaw connects a raw client to a served socket, past the greeting.
func dialRaw(t *testing.T, sock string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	rc := &rawClient{t: t, c: c}
	var hello [18]byte
	rc.read(hello[:])
	if binary.BigEndian.Uint64(hello[:]) != nbdMagic {
		t.Fatalf("bad greeting % x", hello)
	}
	rc.write(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes))
	return rc
}

// writeRead writes a pattern over the raw connection, reads it back and
// checks it, with simple replies.
func (rc *rawClient) writeRead(handle, off uint64, fill byte) {
	rc.t.Helper()
	data := bytes.Repeat([]byte{fill}, 4096)
	rc.request(cmdWrite, cmdFlagFUA, handle, off, 4096, data)
	if h, e := rc.simpleReply(); h != handle || e != 0 {
		rc.t.Fatalf("write: handle %d error %d", h, e)
	}
	rc.request(cmdRead, 0, handle+1, off, 4096, nil)
	if h, e := rc.simpleReply(); h != handle+1 || e != 0 {
		rc.t.Fatalf("read: handle %d error %d", h, e)
	}
	got := make([]byte, 4096)
	rc.read(got)
	if !bytes.Equal(got, data) {
		rc.t.Fatalf("read back %x..., want %x...", got[:8], data[:8])
	}
}

// runQuiet runs a tool and returns its combined output and whether it
// succeeded, for commands that are expected to fail.
func runQuiet(name string, args ...string) (string, bool) {
	out, err := exec.Command(name, args...).CombinedOutput()
	s := string(out)
	return s, err == nil && !strings.Contains(s, "failed") && !strings.Contains(s, "error")
}

// TestPanicFailsOnlyItsExport: a panic in one export's request path, in
// any backend method, fails that request with EIO and the export from
// then on, and tells its owner; the other export of the same server, and
// a connection to it that was open all along, keep working.
func TestPanicFailsOnlyItsExport(t *testing.T) {
	testcmd.Need(t, "qemu-io", "nbdinfo")
	tests := []struct {
		method  string
		trigger []string // a real client's command that reaches method
	}{
		{"WriteAt", []string{"qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k"}},
		{"ReadAt", []string{"qemu-io", "-f", "raw", "-c", "read 0 4k"}},
		{"ReadFile", []string{"qemu-io", "-f", "raw", "-c", "read 0 512k"}},
		{"Flush", []string{"qemu-io", "-f", "raw", "-c", "write 0 4k", "-c", "flush"}},
		{"Discard", []string{"qemu-io", "-f", "raw", "-c", "discard 0 64k"}},
		{"Extent", []string{"nbdinfo", "--map"}},
		{"Size", []string{"nbdinfo", "--size"}},
	}
	for _, tc := range tests {
		t.Run(tc.method, func(t *testing.T) {
			fb, _ := newFileBackend(t, 8<<20)
			// Data, so that reads reach ReadAt and ReadFile, not holes.
			if _, err := fb.WriteAt(bytes.Repeat([]byte{0x77}, 1<<20), 0); err != nil {
				t.Fatal(err)
			}
			bad := &panickyBackend{splicingBackend: &splicingBackend{fileBackend: fb, size: 8 << 20}, trip: tc.method}
			good, goodPath := newFileBackend(t, 8<<20)
			failures := make(chan error, 2)
			srv := New(ServerOptions{})
			if err := srv.Add(Export{Name: "bad", Backend: bad, OnFailure: func(err error) { failures <- err }}); err != nil {
				t.Fatal(err)
			}
			if err := srv.Add(Export{Name: "good", Backend: good}); err != nil {
				t.Fatal(err)
			}
			sock := serveServer(t, srv)
			// A connection to the good export, open across the panic.
			open := dialRaw(t, sock)
			open.goExport("good")
			open.writeRead(1, 0, 0x11)

			bad.armed.Store(true)
			args := append(tc.trigger[1:], nbdURI(sock, "bad"))
			if out, ok := runQuiet(tc.trigger[0], args...); ok {
				t.Errorf("%s succeeded although %s panicked:\n%s", tc.trigger[0], tc.method, out)
			}
			if bad.armed.Load() {
				t.Fatalf("the client never reached %s", tc.method)
			}
			var perr *PanicError
			if err := srv.Failed("bad"); !errors.As(err, &perr) || !errors.Is(err, ErrExportFailed) {
				t.Fatalf("Failed(bad) = %v, want a *PanicError", err)
			}
			if !strings.Contains(fmt.Sprint(perr.Value), tc.method) || !bytes.Contains(perr.Stack, []byte("panickyBackend")) {
				t.Errorf("failure does not show the panic: value %v, stack:\n%s", perr.Value, perr.Stack)
			}
			select {
			case err := <-failures:
				if !errors.Is(err, ErrExportFailed) {
					t.Errorf("OnFailure got %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("OnFailure was not called")
			}
			if err := srv.Failed("good"); err != nil {
				t.Errorf("Failed(good) = %v", err)
			}

			// The backend works again, but the export stays failed:
			// every request is EIO, on the wire and for qemu-io.
			rc := dialRaw(t, sock)
			rc.goExport("bad")
			for i, typ := range []uint16{cmdRead, cmdFlush, cmdWrite} {
				var payload []byte
				if typ == cmdWrite {
					payload = make([]byte, 512)
				}
				rc.request(typ, 0, uint64(10+i), 0, uint32(len(payload)), payload)
				if typ == cmdRead {
					rc.request(cmdRead, 0, uint64(10+i), 0, 0, nil)
				}
				if h, e := rc.simpleReply(); h != uint64(10+i) || e != errIO {
					t.Errorf("request %d to the failed export: handle %d error %d, want EIO (%d)", typ, h, e, errIO)
				}
				if typ == cmdRead {
					rc.simpleReply() // the zero-length read
				}
			}
			if out, ok := runQuiet("qemu-io", "-f", "raw", "-c", "read 0 4k", nbdURI(sock, "bad")); ok || !strings.Contains(out, "Input/output error") {
				t.Errorf("qemu-io read of the failed export:\n%s", out)
			}

			// The good export: the old connection and new ones.
			open.writeRead(3, 8192, 0x22)
			testcmd.Combined(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 1M 1M", "-c", "read -P 0x44 1M 1M", nbdURI(sock, "good"))
			if out := testcmd.Combined(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x22 8k 4k", nbdURI(sock, "good")); strings.Contains(out, "fail") {
				t.Errorf("good export:\n%s", out)
			}
			data, err := os.ReadFile(goodPath)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data[1<<20:2<<20], bytes.Repeat([]byte{0x44}, 1<<20)) {
				t.Error("the good export's backend lacks qemu-io's write")
			}
			if len(failures) != 0 {
				t.Errorf("OnFailure called again: %v", <-failures)
			}
		})
	}
}

// gateBackend blocks every call to WriteAt in [gateOff, gateEnd) until
// gate is closed, counting the calls that entered.
type gateBackend struct {
	memBackend
	gateOff, gateEnd int64
	gate             chan struct{}
	entered          atomic.Int64
	// returned counts gated calls that have finished.
	returned atomic.Int64
}

func newGateBackend(size int, gateOff int64) *gateBackend {
	return &gateBackend{memBackend: memBackend{data: make([]byte, size)}, gateOff: gateOff, gateEnd: int64(size), gate: make(chan struct{})}
}

func (g *gateBackend) gated(off int64) bool { return off >= g.gateOff && off < g.gateEnd }

func (g *gateBackend) WriteAt(p []byte, off int64) (int, error) {
	if g.gated(off) {
		g.entered.Add(1)
		<-g.gate
		defer g.returned.Add(1)
	}
	return g.memBackend.WriteAt(p, off)
}

// waitFor polls cond until it holds, failing the test after 20 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting until %s", what)
		case <-tick.C:
		}
	}
}

// TestAddRemove: exports come and go while the server runs; Remove ends
// the export's connections, waits for its running requests, is
// idempotent, and bounded by its context.
func TestAddRemove(t *testing.T) {
	srv := New(ServerOptions{})
	sock := serveServer(t, srv)
	if out, _ := runQuiet("nbdinfo", "--list", nbdURI(sock, "")); strings.Contains(out, "export=") {
		t.Errorf("nbdinfo --list of a server without exports lists some:\n%s", out)
	}
	a := newGateBackend(1<<20, 64<<10)
	b := &memBackend{data: make([]byte, 1<<20)}
	for _, e := range []Export{{Name: "a", Backend: a}, {Name: "b", Backend: b}} {
		if err := srv.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := srv.Add(Export{Name: "a", Backend: b}); err == nil {
		t.Error("Add accepted a second export named a")
	}
	if got := srv.Exports(); strings.Join(got, ",") != "a,b" {
		t.Errorf("Exports() = %v", got)
	}
	out := testcmd.Combined(t, "nbdinfo", "--list", nbdURI(sock, ""))
	if !strings.Contains(out, "export=\"a\"") && !strings.Contains(out, "export=a") || !strings.Contains(out, "b") {
		t.Errorf("nbdinfo --list:\n%s", out)
	}

	ra := dialRaw(t, sock)
	ra.goExport("a")
	ra.writeRead(1, 0, 0x55) // below the gate
	rb := dialRaw(t, sock)
	rb.goExport("b")
	// A write held in a's backend while a is removed.
	ra.request(cmdWrite, 0, 9, 64<<10, 4, []byte("late"))
	waitFor(t, "the write reached the backend", func() bool { return a.entered.Load() == 1 })

	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	err := srv.Remove(short, "a")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Remove with a request stuck: %v, want a deadline error", err)
	}
	// a's connection was ended at once, and a is gone for new clients.
	if _, err := ra.c.Read(make([]byte, 1)); err == nil {
		t.Error("a's connection is still open after Remove")
	}
	if out, ok := runQuiet("nbdinfo", "--size", nbdURI(sock, "a")); ok {
		t.Errorf("a removed, yet nbdinfo found it:\n%s", out)
	}
	if err := srv.Add(Export{Name: "a", Backend: b}); err == nil {
		t.Error("Add reused the name of an export whose requests are still running")
	}
	// b was never disturbed.
	rb.writeRead(3, 0, 0x66)

	removed := make(chan error, 1)
	go func() { removed <- srv.Remove(context.Background(), "a") }()
	close(a.gate)
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
	if a.returned.Load() != 1 {
		t.Error("Remove returned before the request it waited for")
	}
	if err := srv.Remove(context.Background(), "a"); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	if err := srv.Remove(context.Background(), "never"); err != nil {
		t.Errorf("Remove of an unknown export: %v", err)
	}
	if got := srv.Exports(); strings.Join(got, ",") != "b" {
		t.Errorf("Exports() = %v", got)
	}
	// The default export is now b.
	if out := testcmd.Combined(t, "nbdinfo", "--size", nbdURI(sock, "")); strings.TrimSpace(out) != "1048576" {
		t.Errorf("default export size %q", out)
	}
	if err := srv.Add(Export{Name: "a", Backend: b}); err != nil {
		t.Fatalf("Add after the export drained: %v", err)
	}
	testcmd.Combined(t, "qemu-io", "-f", "raw", "-c", "read -P 0x66 0 4k", nbdURI(sock, "a"))
}

// TestAddRemoveConcurrent churns exports while clients use them; run
// with -race.
func TestAddRemoveConcurrent(t *testing.T) {
	srv := New(ServerOptions{})
	sock := serveServer(t, srv)
	rounds := 30
	if testing.Short() {
		rounds = 10
	}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		name := fmt.Sprintf("e%d", g)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				if err := srv.Add(Export{Name: name, Backend: &memBackend{data: make([]byte, 1<<20)}}); err != nil {
					t.Error(err)
					return
				}
				c, err := net.Dial("unix", sock)
				if err != nil {
					t.Error(err)
					return
				}
				// Whatever the client manages before Remove ends it.
				go func() {
					c.SetDeadline(time.Now().Add(10 * time.Second))
					b := binary.BigEndian.AppendUint32(make([]byte, 0, 64), flagFixedNewstyle|flagNoZeroes)
					b = append(b, optBytes(optGo, goData(name))...)
					for k := 0; k < 8; k++ {
						b = append(b, reqBytes(cmdWrite, 0, uint64(k)*4096, 4096, make([]byte, 4096))...)
					}
					_, _ = c.Write(b)
				}()
				if err := srv.Remove(context.Background(), name); err != nil {
					t.Error(err)
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	if got := srv.Exports(); len(got) != 0 {
		t.Errorf("exports left: %v", got)
	}
}
