package serving

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// sharedDir is a temporary directory that other users may enter, for a
// socket that a child running as another uid must reach.
func sharedDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	// t.TempDir makes the directory and its parent 0700.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func call(t *testing.T, path string, req Request) (Reply, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return Call(ctx, path, req)
}

// TestControlPeerCredentials: the control socket answers root and the
// serving process's own uid only. The socket is made world-writable here,
// as a mistaken chmod or a permissive directory would, so that only the
// peer-credential check stands between another user and the stack.
func TestControlPeerCredentials(t *testing.T) {
	const nobody = 65534
	v := open(t, newStack(t, 1<<20), OpenOptions{})
	sock := filepath.Join(sharedDir(t), "ctl.sock")
	if err := v.ServeControl(sock); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("control socket: %v, %v; want a socket with mode 0600", fi, err)
	}
	// With the socket's own mode in force, another user cannot connect,
	// and is told so rather than that the stack is not served.
	if res := callAs(t, nobody, nobody, sock, Request{Op: OpSnapshot}); !strings.Contains(res.Err, "permission denied") || strings.Contains(res.Err, ErrNotServed.Error()) {
		t.Fatalf("uid %d on a 0600 socket: %q, want permission denied", nobody, res.Err)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		uid     uint32
		allowed bool
	}{
		{"root", 0, true},
		{"another user", nobody, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			depth := v.Stack().Depth()
			res := callAs(t, tc.uid, tc.uid, sock, Request{Op: OpSnapshot})
			grew := v.Stack().Depth() - depth
			if tc.allowed && (res.Err != "" || grew != 1) {
				t.Fatalf("uid %d: %q, %d new snapshots; want one snapshot", tc.uid, res.Err, grew)
			}
			if !tc.allowed && (grew != 0 || !strings.Contains(res.Err, "not allowed")) {
				t.Fatalf("uid %d: reply error %q, %d new snapshots; want a refusal and none", tc.uid, res.Err, grew)
			}
		})
	}
}

// TestPeerAllowed is the rule itself: root, and the server's own uid.
func TestPeerAllowed(t *testing.T) {
	for _, tc := range []struct {
		peer, self uint32
		want       bool
	}{
		{0, 0, true},
		{0, 1000, true},
		{1000, 1000, true},
		{1001, 1000, false},
		{65534, 0, false},
	} {
		if got := peerAllowed(tc.peer, tc.self); got != tc.want {
			t.Errorf("peerAllowed(peer %d, server %d) = %v, want %v", tc.peer, tc.self, got, tc.want)
		}
	}
}

// rawExchange writes payload to the control socket (forever, when endless)
// and returns the reply line, within a deadline.
func rawExchange(t *testing.T, sock string, payload []byte, endless, closeWrite bool) Reply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	dl, _ := ctx.Deadline()
	nc.SetDeadline(dl)
	writeDone := make(chan struct{})
	go func() {
		defer close(writeDone)
		for {
			// The server stops reading at its bound and closes the
			// connection: the write then fails and this ends.
			if _, err := nc.Write(payload); err != nil || !endless {
				break
			}
		}
		if closeWrite {
			nc.(*net.UnixConn).CloseWrite()
		}
	}()
	line, err := bufio.NewReader(nc).ReadBytes('\n')
	if err != nil {
		t.Fatalf("no reply: %v (got %q)", err, line)
	}
	<-writeDone
	var rep Reply
	if err := json.Unmarshal(line, &rep); err != nil {
		t.Fatalf("reply %q: %v", line, err)
	}
	return rep
}

// TestControlRequestBound: the server reads at most one bounded line. A
// longer line, even a valid request padded with blanks, and an endless
// one are refused at the bound instead of being buffered; an incomplete
// one ends with an error.
func TestControlRequestBound(t *testing.T) {
	v := open(t, newStack(t, 1<<20), OpenOptions{})
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	if err := v.ServeControl(sock); err != nil {
		t.Fatal(err)
	}
	compact := []byte(`{"op":"compact"}` + "\n")
	for _, tc := range []struct {
		name       string
		payload    []byte
		endless    bool
		closeWrite bool
		wantErr    string // "" means success
	}{
		{"valid", compact, false, false, ""},
		{"padded past the bound", append([]byte(strings.Repeat(" ", 8<<10)), compact...), false, false, "longer than"},
		{"endless line", []byte(strings.Repeat("x", 64<<10)), true, false, "longer than"},
		{"incomplete line", []byte(`{"op":"comp`), false, true, "incomplete"},
		{"unknown op", []byte(`{"op":"format"}` + "\n"), false, false, "unknown control op"},
		{"unknown field", []byte(`{"op":"compact","force":true}` + "\n"), false, false, "unknown field"},
		{"grow without size", []byte(`{"op":"grow"}` + "\n"), false, false, "size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep := rawExchange(t, sock, tc.payload, tc.endless, tc.closeWrite)
			switch {
			case tc.wantErr == "" && rep.Error != "":
				t.Fatalf("reply error %q", rep.Error)
			case tc.wantErr != "" && !strings.Contains(rep.Error, tc.wantErr):
				t.Fatalf("reply error %q, want one mentioning %q", rep.Error, tc.wantErr)
			}
		})
	}
}

// TestControlSocketSuccessor: a server that stops after a successor bound
// the same path (a restarted node plugin, a new ploopctl serve) leaves the
// successor's socket in place; a server removes its own socket; a path
// that is not a socket is never replaced.
func TestControlSocketSuccessor(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	first := open(t, newStack(t, 1<<20), OpenOptions{})
	second := open(t, newStack(t, 1<<20), OpenOptions{})
	if err := first.ServeControl(sock); err != nil {
		t.Fatal(err)
	}
	if err := second.ServeControl(sock); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("the predecessor's Close removed the successor's socket: %v", err)
	}
	if _, err := call(t, sock, Request{Op: OpSnapshot}); err != nil {
		t.Fatalf("the successor does not answer: %v", err)
	}
	if d := second.Stack().Depth(); d != 2 {
		t.Fatalf("the successor's stack has depth %d after a snapshot through the socket", d)
	}
	if err := second.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the last server left its socket behind: %v", err)
	}
	if _, err := call(t, sock, Request{Op: OpSnapshot}); !errors.Is(err, ErrNotServed) {
		t.Fatalf("call with no server: %v, want ErrNotServed", err)
	}

	// A stale socket (its server was killed) is replaced; a regular file
	// is not.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if _, err := call(t, sock, Request{Op: OpSnapshot}); !errors.Is(err, ErrNotServed) {
		t.Fatalf("call to a stale socket: %v, want ErrNotServed", err)
	}
	third := open(t, newStack(t, 1<<20), OpenOptions{})
	if err := third.ServeControl(sock); err != nil {
		t.Fatalf("serving over a stale socket: %v", err)
	}
	if _, err := call(t, sock, Request{Op: OpCompact}); err != nil {
		t.Fatal(err)
	}
	third.Close(context.Background())
	file := filepath.Join(t.TempDir(), "not-a-socket")
	if err := os.WriteFile(file, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	fourth := open(t, newStack(t, 1<<20), OpenOptions{})
	if err := fourth.ServeControl(file); err == nil {
		t.Fatal("ServeControl replaced a regular file")
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep" {
		t.Fatalf("the regular file changed: %q, %v", b, err)
	}
}

// TestCloseWithRequestsInFlight: Close while clients keep sending control
// requests. Close stops the control socket and waits for the requests it
// accepted, and those need the volume; so Close must not hold the volume
// while it waits. Every Close must return, and every request must either
// succeed or fail cleanly.
func TestCloseWithRequestsInFlight(t *testing.T) {
	rounds := 20
	if testing.Short() {
		rounds = 5
	}
	for round := range rounds {
		// No Close in a cleanup: after a deadlock it would hang the test
		// instead of letting it fail.
		v, err := Open(newStack(t, 1<<20), OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(t.TempDir(), "ctl.sock")
		if err := v.ServeControl(sock); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		var wg sync.WaitGroup
		var ok atomic.Int64
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					if _, err := Call(ctx, sock, Request{Op: OpCompact}); err != nil {
						return
					}
					ok.Add(1)
				}
			}()
		}
		// Close once requests are flowing.
		for ok.Load() < 2 && ctx.Err() == nil {
			runtime.Gosched()
		}
		closed := make(chan error, 1)
		go func() { closed <- v.Close(ctx) }()
		select {
		case err := <-closed:
			if err != nil {
				t.Fatalf("round %d: Close: %v", round, err)
			}
		case <-ctx.Done():
			t.Fatalf("round %d: Close did not return with control requests in flight (%d answered)", round, ok.Load())
		}
		wg.Wait()
		cancel()
	}
}
