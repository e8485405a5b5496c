package driverproc

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestStart runs the real ploop-csi (mode all starts without nbd: the
// node refuses only the calls that need it), calls it, and stops it.
func TestStart(t *testing.T) {
	if testing.Short() {
		t.Skip("builds ploop-csi")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "ploop-csi")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/ploop-csi/ploop-csi/cmd/ploop-csi").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log bytes.Buffer
	sock := filepath.Join(dir, "csi.sock")
	p, err := Start(ctx, Config{Binary: bin, Socket: sock, Output: &log,
		Args: []string{"--nodeid", "n", "--storage-root", root, "--v", "2"}})
	if err != nil {
		t.Fatalf("Start: %v\n%s", err, log.String())
	}
	if _, err := p.Node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); err != nil {
		t.Errorf("NodeGetInfo: %v", err)
	}
	if _, err := p.Controller.ListVolumes(ctx, &csi.ListVolumesRequest{}); err != nil {
		t.Errorf("ListVolumes: %v", err)
	}
	if err := p.Stop(time.Minute); err != nil {
		t.Fatalf("Stop: %v\n%s", err, log.String())
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	if err := p.Stop(time.Minute); err == nil || !strings.Contains(err.Error(), "had exited") {
		t.Errorf("second Stop: %v, want an error saying it had exited", err)
	}
}

// TestStartFails: a driver that exits at once, or never answers, is an
// error, and Start leaves no process behind.
func TestStartFails(t *testing.T) {
	tests := []struct {
		name, binary string
		args         []string
		timeout      time.Duration
		want         string
	}{
		{"exits", "/bin/false", nil, time.Minute, "exited before it answered Probe"},
		{"silent", "", nil, 500 * time.Millisecond, "probe ploop-csi"},
		{"missing", "/nonexistent/ploop-csi", nil, time.Minute, "start /nonexistent/ploop-csi"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.binary == "" {
				// A driver that runs but never serves.
				tt.binary = filepath.Join(dir, "silent")
				if err := os.WriteFile(tt.binary, []byte("#!/bin/sh\nexec sleep 600\n"), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			cfg := Config{Binary: tt.binary, Socket: filepath.Join(dir, "csi.sock"), Args: tt.args, ReadyTimeout: tt.timeout}
			p, err := Start(context.Background(), cfg)
			if err == nil {
				p.Kill()
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Start: %v, want %q", err, tt.want)
			}
			if d := time.Since(start); d > 30*time.Second {
				t.Errorf("Start took %v to fail", d)
			}
		})
	}
}
