// Package driverproc runs the ploop-csi binary as a child process and
// connects CSI gRPC clients to it: what the demo, the VM tests and the
// benchmarks do to drive the real driver through its API.
package driverproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Config says how to start the driver.
type Config struct {
	// Binary is the ploop-csi executable.
	Binary string
	// Socket is the unix socket the driver serves on; Start passes it as
	// --endpoint unix://Socket.
	Socket string
	// Args are the driver's other flags (--nodeid, --storage-root, ...).
	Args []string
	// Output receives the driver's stdout and stderr; nil discards them.
	Output io.Writer
	// ReadyTimeout bounds the wait for the first Probe; default 3 minutes
	// (a start recovers attached volumes first, slow under emulation).
	ReadyTimeout time.Duration
}

// Proc is a running ploop-csi and a connection to it.
type Proc struct {
	Cmd        *exec.Cmd
	Conn       *grpc.ClientConn
	Identity   csi.IdentityClient
	Controller csi.ControllerClient
	Node       csi.NodeClient

	exited  chan struct{}
	exitErr error // set before exited is closed
}

// Start runs the driver and returns once it answers Probe ready. It fails,
// leaving no process behind, when the driver exits first, when Probe fails
// or says not ready, or when ctx or ReadyTimeout ends first.
func Start(ctx context.Context, cfg Config) (*Proc, error) {
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 3 * time.Minute
	}
	args := append([]string{"--endpoint", "unix://" + cfg.Socket}, cfg.Args...)
	p := &Proc{Cmd: exec.Command(cfg.Binary, args...), exited: make(chan struct{})}
	p.Cmd.Stdout, p.Cmd.Stderr = cfg.Output, cfg.Output
	if err := p.Cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cfg.Binary, err)
	}
	go func() {
		p.exitErr = p.Cmd.Wait()
		close(p.exited)
	}()
	if err := p.connect(ctx, cfg); err != nil {
		p.Kill()
		return nil, err
	}
	return p, nil
}

func (p *Proc) connect(ctx context.Context, cfg Config) error {
	var err error
	p.Conn, err = grpc.NewClient("unix://"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", cfg.Socket, err)
	}
	p.Identity, p.Controller, p.Node = csi.NewIdentityClient(p.Conn), csi.NewControllerClient(p.Conn), csi.NewNodeClient(p.Conn)
	pctx, cancel := context.WithTimeout(ctx, cfg.ReadyTimeout)
	defer cancel()
	// WaitForReady waits for the socket; a driver that dies meanwhile
	// must end the wait at once.
	go func() {
		select {
		case <-p.exited:
			cancel()
		case <-pctx.Done():
		}
	}()
	resp, err := p.Identity.Probe(pctx, &csi.ProbeRequest{}, grpc.WaitForReady(true))
	if err != nil {
		select {
		case <-p.exited:
			return fmt.Errorf("ploop-csi exited before it answered Probe: %v", p.exitErr)
		default:
		}
		return fmt.Errorf("probe ploop-csi: %w", err)
	}
	if r := resp.GetReady(); r != nil && !r.GetValue() {
		return errors.New("probe ploop-csi: not ready")
	}
	return nil
}

// Pid is the driver's process id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Exited is closed once the driver has exited; ExitErr then says how.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// ExitErr is the driver's exit status as exec.Cmd.Wait reports it; valid
// once Exited is closed.
func (p *Proc) ExitErr() error {
	<-p.exited
	return p.exitErr
}

// Stop closes the connection and sends SIGTERM, then waits for a clean
// exit; after wait it kills the driver. A driver that had already exited,
// that exits with an error or that has to be killed is an error.
func (p *Proc) Stop(wait time.Duration) error {
	if p.Conn != nil {
		p.Conn.Close()
	}
	select {
	case <-p.exited:
		return fmt.Errorf("ploop-csi had exited: %v", p.exitErr)
	default:
	}
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("stop ploop-csi: %w", err)
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
		p.Kill()
		return fmt.Errorf("ploop-csi did not stop within %v of SIGTERM; killed", wait)
	}
	if p.exitErr != nil {
		return fmt.Errorf("ploop-csi after SIGTERM: %w", p.exitErr)
	}
	return nil
}

// Kill kills the driver, if it still runs, and waits for it; it closes the
// connection too.
func (p *Proc) Kill() {
	if p.Conn != nil {
		p.Conn.Close()
	}
	select {
	case <-p.exited:
	default:
		p.Cmd.Process.Kill()
		<-p.exited
	}
}
