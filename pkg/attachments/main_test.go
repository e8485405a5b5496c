package attachments

// The restart tests need a node plugin process that can be SIGKILLed: they
// re-execute this test binary with childEnv set, and TestMain then runs
// childMain, which owns a Manager, instead of the tests.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

const childEnv = "PLOOP_CSI_ATTACHMENTS_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	os.Exit(m.Run())
}

// childConfig is what a child Manager is started with: the JSON-able
// part of Options, and a volume to stage after recovery.
type childConfig struct {
	StorageRoot     string
	StateDir        string
	PathPrefixes    []string
	DeadConnTimeout time.Duration
	Transport       Transport
	Stage           *StageRequest
}

// childMain starts a Manager (recovering whatever the state holds), stages
// the volume it was asked to, prints "ready DEVICE" and waits to be
// killed.
func childMain() int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &cfg); err != nil {
		fmt.Println("error:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	m, err := New(ctx, Options{
		StorageRoot: cfg.StorageRoot, StateDir: cfg.StateDir, PathPrefixes: cfg.PathPrefixes,
		Attach: AttachOptions{DeadConnTimeout: cfg.DeadConnTimeout, Connections: 2, Transport: cfg.Transport},
	})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	dev := ""
	if cfg.Stage != nil {
		if err := m.Stage(ctx, *cfg.Stage); err != nil {
			fmt.Println("error:", err)
			return 1
		}
	}
	m.mu.Lock()
	for _, v := range m.vols {
		if v.served != nil {
			dev = v.served.Device()
		}
	}
	m.mu.Unlock()
	fmt.Println("ready", dev)
	select {}
}

// startChild starts a node plugin process and returns it once its Manager
// has recovered (and staged), with the device it serves.
func startChild(t *testing.T, cfg childConfig) (*exec.Cmd, string) {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), childEnv+"="+string(b))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	lines := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		lines <- strings.TrimSpace(l)
		io.Copy(io.Discard, out)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	select {
	case l := <-lines:
		dev, ok := strings.CutPrefix(l, "ready")
		if !ok {
			t.Fatalf("node plugin child: %q", l)
		}
		return cmd, strings.TrimSpace(dev)
	case <-ctx.Done():
		t.Fatal("node plugin child not ready in 3 minutes")
	}
	return nil, ""
}

// kill SIGKILLs a child and reaps it.
func kill(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
}
