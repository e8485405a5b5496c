// Package csidriver runs the real ploop-csi binary for tests inside the
// vmtest guest and talks CSI to it over its unix socket.
//
// Build, as vmtest.Options.Prepare, builds the binary into the exchange
// directory on the host; Start runs it in the guest (mode all, over a
// storage root) and returns once it answers Probe, which is after its
// restart recovery. A Driver can be stopped (SIGTERM, which must end
// cleanly) or killed (SIGKILL), and Start again on the same socket, root
// and node id takes over what it had attached. CheckLog fails a test for
// every error the driver logged.
//
// Condition reads the VolumeCondition the driver sends as CSI 1.12 defines
// it (an unknown field of the 1.13 messages this module builds against).
package csidriver

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// Binary is the file name Build gives the driver in the exchange directory.
const Binary = "ploop-csi"

// Build builds ploop-csi into dir; use it as vmtest.Options.Prepare.
func Build(dir string) error {
	out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v0.0.0-vmtest", "-o", filepath.Join(dir, Binary),
		"github.com/ploop-csi/ploop-csi/cmd/ploop-csi").CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build ploop-csi: %v\n%s", err, out)
	}
	return nil
}

// Config is how a Driver is started.
type Config struct {
	// Root is the storage root (--storage-root).
	Root string
	// Socket is the unix socket path of the endpoint.
	Socket string
	// NodeID is --nodeid; default "vm-node".
	NodeID string
	// Args are further flags (--kubelet-dir, --overcommit-ratio, ...).
	Args []string
	// StartTimeout bounds the wait for the first Probe; default 3 minutes.
	StartTimeout time.Duration
}

// Driver is a running ploop-csi process and a client connection to it.
type Driver struct {
	Config
	Conn       *grpc.ClientConn
	Identity   csi.IdentityClient
	Controller csi.ControllerClient
	Node       csi.NodeClient

	cmd  *exec.Cmd
	out  *logBuffer
	done chan struct{} // closed once the process has exited
	err  error         // its exit status, set before done is closed
}

// Start runs ploop-csi in mode all with cfg and waits until it answers
// Probe. t.Cleanup kills it if it still runs, and prints the end of its
// log when t failed.
func Start(t testing.TB, ctx context.Context, cfg Config) *Driver {
	t.Helper()
	if cfg.NodeID == "" {
		cfg.NodeID = "vm-node"
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 3 * time.Minute
	}
	d := &Driver{Config: cfg, out: &logBuffer{}, done: make(chan struct{})}
	args := append([]string{"--nodeid", cfg.NodeID, "--storage-root", cfg.Root, "--endpoint", "unix://" + cfg.Socket, "--v", "2"}, cfg.Args...)
	d.cmd = exec.Command(filepath.Join(vmtest.ExchangeDir(), Binary), args...)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start ploop-csi: %v", err)
	}
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			d.cmd.Process.Kill()
			<-d.done
		}
		if t.Failed() {
			t.Logf("ploop-csi (pid %d) log:\n%s", d.cmd.Process.Pid, Tail(d.Log(), 200))
		}
	})
	var err error
	// Retry the connection at a short, steady pace while the socket does
	// not exist yet: gRPC's default backoff would add seconds to the time
	// a restart takes to answer.
	d.Conn, err = grpc.NewClient("unix://"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.2, MaxDelay: 100 * time.Millisecond},
			MinConnectTimeout: 5 * time.Second}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Conn.Close() })
	d.Identity, d.Controller, d.Node = csi.NewIdentityClient(d.Conn), csi.NewControllerClient(d.Conn), csi.NewNodeClient(d.Conn)

	// Wait for Probe, but not past the process's exit.
	wctx, cancel := context.WithTimeout(ctx, cfg.StartTimeout)
	defer cancel()
	go func() {
		select {
		case <-d.done:
			cancel()
		case <-wctx.Done():
		}
	}()
	if _, err := d.Identity.Probe(wctx, &csi.ProbeRequest{}, grpc.WaitForReady(true)); err != nil {
		select {
		case <-d.done:
			t.Fatalf("ploop-csi exited before it answered Probe (%v):\n%s", d.err, d.Log())
		default:
		}
		t.Fatalf("ploop-csi did not answer Probe: %v\n%s", err, d.Log())
	}
	return d
}

// Pid is the process id.
func (d *Driver) Pid() int { return d.cmd.Process.Pid }

// Log is what the process printed so far.
func (d *Driver) Log() string { return d.out.String() }

// Stop sends SIGTERM and expects a clean exit that removes the socket.
func (d *Driver) Stop(t testing.TB) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.wait(time.Minute); err != nil {
		t.Errorf("ploop-csi after SIGTERM: %v", err)
	}
	if _, err := os.Lstat(d.Socket); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

// Kill sends SIGKILL and waits for the process to be gone.
func (d *Driver) Kill(t testing.TB) {
	t.Helper()
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := d.wait(time.Minute); err == nil {
		t.Fatal("ploop-csi exited cleanly after SIGKILL")
	} else if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("ploop-csi after SIGKILL: %v", err)
	}
}

func (d *Driver) wait(timeout time.Duration) error {
	select {
	case <-d.done:
		return d.err
	case <-time.After(timeout):
		return fmt.Errorf("still running %v after the signal", timeout)
	}
}

// klogError matches klog's error and fatal lines ("E1202 03:04:05.123456 ...").
var klogError = regexp.MustCompile(`^[EF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} `)

// CheckLog fails t for every error line the driver logged (every call it
// failed as its own fault, Internal or Unavailable, is one) and every
// panic, except lines matching one of allowed.
func (d *Driver) CheckLog(t testing.TB, allowed ...*regexp.Regexp) {
	t.Helper()
	CheckLog(t, d.Log(), allowed...)
}

// CheckLog is Driver.CheckLog for the output of a driver started some
// other way (the demo's).
func CheckLog(t testing.TB, log string, allowed ...*regexp.Regexp) {
	t.Helper()
lines:
	for _, l := range strings.Split(log, "\n") {
		if !klogError.MatchString(l) && !strings.HasPrefix(l, "panic") {
			continue
		}
		for _, a := range allowed {
			if a.MatchString(l) {
				continue lines
			}
		}
		t.Errorf("ploop-csi logged an error: %s", l)
	}
}

// Tail is the last n lines of s.
func Tail(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// logBuffer collects the process's output; the copying goroutine of
// os/exec writes while tests read.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// VolumeCondition is the CSI 1.12 VolumeCondition message.
type VolumeCondition struct {
	Abnormal bool
	Message  string
}

// Condition reads the VolumeCondition in field 2 of m (a
// NodeGetVolumeStatsResponse, or the status of ControllerGetVolume and
// ListVolumes), which CSI 1.13 dropped and the driver sends as an unknown
// field; ok is false when m carries none.
func Condition(m proto.Message) (c VolumeCondition, ok bool, err error) {
	b := m.ProtoReflect().GetUnknown()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return c, false, fmt.Errorf("unknown fields: %w", protowire.ParseError(n))
		}
		b = b[n:]
		if num != 2 || typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return c, false, fmt.Errorf("unknown field %d: %w", num, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		inner, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return c, false, fmt.Errorf("VolumeCondition: %w", protowire.ParseError(n))
		}
		b = b[n:]
		c, ok = VolumeCondition{}, true
		for len(inner) > 0 {
			f, ft, n := protowire.ConsumeTag(inner)
			if n < 0 {
				return c, false, fmt.Errorf("VolumeCondition: %w", protowire.ParseError(n))
			}
			inner = inner[n:]
			switch {
			case f == 1 && ft == protowire.VarintType:
				v, n := protowire.ConsumeVarint(inner)
				if n < 0 {
					return c, false, fmt.Errorf("VolumeCondition.abnormal: %w", protowire.ParseError(n))
				}
				c.Abnormal, inner = v != 0, inner[n:]
			case f == 2 && ft == protowire.BytesType:
				s, n := protowire.ConsumeString(inner)
				if n < 0 {
					return c, false, fmt.Errorf("VolumeCondition.message: %w", protowire.ParseError(n))
				}
				c.Message, inner = s, inner[n:]
			default:
				n = protowire.ConsumeFieldValue(f, ft, inner)
				if n < 0 {
					return c, false, fmt.Errorf("VolumeCondition field %d: %w", f, protowire.ParseError(n))
				}
				inner = inner[n:]
			}
		}
	}
	return c, ok, nil
}
