package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// gatedBackend blocks reads at gateOff until gate is closed.
type gatedBackend struct {
	memBackend
	gateOff int64
	entered chan struct{}
	gate    chan struct{}
}

func (g *gatedBackend) ReadAt(p []byte, off int64) (int, error) {
	if off == g.gateOff {
		close(g.entered)
		<-g.gate
	}
	return g.memBackend.ReadAt(p, off)
}

func TestRepliesOutOfOrder(t *testing.T) {
	b := &gatedBackend{memBackend: memBackend{data: make([]byte, 1<<20)}, gateOff: 4096,
		entered: make(chan struct{}), gate: make(chan struct{})}
	rc := newRawClient(t, Export{Name: "e", Backend: b})
	rc.goExport("e")
	rc.request(cmdRead, 0, 1, 4096, 512, nil)
	<-b.entered // the slow read is running
	rc.request(cmdRead, 0, 2, 0, 512, nil)
	if h, e := rc.simpleReply(); h != 2 || e != 0 {
		t.Fatalf("first reply: handle %d error %d, want the fast read (2)", h, e)
	}
	rc.read(make([]byte, 512))
	close(b.gate)
	if h, e := rc.simpleReply(); h != 1 || e != 0 {
		t.Fatalf("second reply: handle %d error %d, want the slow read (1)", h, e)
	}
	rc.read(make([]byte, 512))
}

// TestDisconnectWaitsForRequests: NBD_CMD_DISC lets requests in flight
// finish and answer before the connection closes.
func TestDisconnectWaitsForRequests(t *testing.T) {
	b := &gatedBackend{memBackend: memBackend{data: make([]byte, 1<<20)}, gateOff: 0,
		entered: make(chan struct{}), gate: make(chan struct{})}
	rc := newRawClient(t, Export{Name: "e", Backend: b})
	rc.goExport("e")
	rc.request(cmdRead, 0, 1, 0, 512, nil)
	<-b.entered
	rc.request(cmdDisc, 0, 2, 0, 0, nil)
	close(b.gate)
	if h, e := rc.simpleReply(); h != 1 || e != 0 {
		t.Fatalf("reply: handle %d error %d", h, e)
	}
	rc.read(make([]byte, 512))
	select {
	case err := <-rc.done:
		if err != nil {
			t.Fatalf("ServeConn after DISC: %v", err)
		}
		rc.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn did not return after DISC")
	}
}

// TestServeTransmission is the kernel's view: no handshake, simple
// replies, a write then a read of the same bytes.
func TestServeTransmission(t *testing.T) {
	srv, err := NewServer(Export{Name: "k", Backend: &memBackend{data: make([]byte, 1<<20)}})
	if err != nil {
		t.Fatal(err)
	}
	client, server := socketpair(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.ServeTransmission(ctx, server, "k") }()
	rc := &rawClient{t: t, c: client}
	rc.request(cmdWrite, cmdFlagFUA, 1, 8192, 4, []byte("ploo"))
	if h, e := rc.simpleReply(); h != 1 || e != 0 {
		t.Fatalf("write: handle %d error %d", h, e)
	}
	rc.request(cmdRead, 0, 2, 8192, 4, nil)
	if h, e := rc.simpleReply(); h != 2 || e != 0 {
		t.Fatalf("read: handle %d error %d", h, e)
	}
	got := make([]byte, 4)
	rc.read(got)
	if string(got) != "ploo" {
		t.Fatalf("read back %q", got)
	}
	// Cancelling the context ends the connection.
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeTransmission after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeTransmission ignored cancellation")
	}
	if err := srv.ServeTransmission(context.Background(), server, "missing"); err == nil {
		t.Error("ServeTransmission accepted an unknown export")
	}
}

func TestNewServerValidates(t *testing.T) {
	mb := &memBackend{data: make([]byte, 512)}
	for name, exps := range map[string][]Export{
		"none":       nil,
		"no backend": {{Name: "a"}},
		"duplicate":  {{Name: "a", Backend: mb}, {Name: "a", Backend: mb}},
		"long name":  {{Name: string(make([]byte, maxNameLen+1)), Backend: mb}},
	} {
		if _, err := NewServer(exps...); err == nil {
			t.Errorf("%s: NewServer accepted it", name)
		}
	}
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	notSock := filepath.Join(dir, "file")
	if err := os.WriteFile(notSock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenUnix(notSock); err == nil {
		t.Fatal("ListenUnix replaced a regular file")
	}
	sock := filepath.Join(dir, "s")
	l1, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket %v, %v; want a 0600 socket", fi.Mode(), err)
	}
	// A stale socket (its listener gone without cleanup) is replaced.
	l1.(*unixListener).UnixListener.Close()
	l2, err := ListenUnix(sock)
	if err != nil {
		t.Fatalf("replacing a stale socket: %v", err)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("temporary directories left behind: %v", entries)
	}
}

func TestBackendsFromSysfs(t *testing.T) {
	sys := t.TempDir()
	for dev, backend := range map[string]string{"nbd0": "vol-a\n", "nbd3": "vol-b\n", "nbd7": ""} {
		if err := os.MkdirAll(filepath.Join(sys, dev), 0o755); err != nil {
			t.Fatal(err)
		}
		if backend != "" {
			if err := os.WriteFile(filepath.Join(sys, dev, "backend"), []byte(backend), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	os.MkdirAll(filepath.Join(sys, "nbdx"), 0o755)
	os.WriteFile(filepath.Join(sys, "nbdx", "backend"), []byte("junk\n"), 0o644)
	got, err := backendsIn(sys)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != "vol-a" || got[3] != "vol-b" {
		t.Fatalf("backends = %v", got)
	}
}

func TestParseDevice(t *testing.T) {
	for in, want := range map[string]int{"/dev/nbd0": 0, "/dev/nbd15": 15, "/dev/nbd": -1, "/dev/sda": -1, "/dev/nbd-1": -1, "nbd1": -1} {
		got, err := ParseDevice(in)
		if (err != nil) != (want < 0) || (err == nil && got != want) {
			t.Errorf("ParseDevice(%q) = %d, %v", in, got, err)
		}
	}
	if DevicePath(4) != "/dev/nbd4" {
		t.Error(DevicePath(4))
	}
}

func TestErrorCodes(t *testing.T) {
	tests := []struct {
		err  error
		want uint32
	}{
		{nil, 0},
		{fmt.Errorf("write x: %w", syscall.ENOSPC), errNoSpc},
		{fmt.Errorf("q: %w", syscall.EDQUOT), errNoSpc},
		{syscall.EROFS, errPerm},
		{syscall.EPERM, errPerm},
		{fmt.Errorf("bad: %w", syscall.EINVAL), errInval},
		{syscall.EOPNOTSUPP, errNotSup},
		{syscall.ENOMEM, errNoMem},
		{errors.New("anything else"), errIO},
		{io.ErrUnexpectedEOF, errIO},
	}
	for _, tc := range tests {
		if got := errorCode(tc.err); got != tc.want {
			t.Errorf("errorCode(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}
