package ploop

import (
	"context"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
)

// TestFailedVolumeContained serves two stacks as two exports of one
// nbd.Server, as the node plugin does, fails a storage call of the first
// during an online snapshot, grow or compaction, and then does I/O on both
// over NBD with qemu-io: the failed volume answers either with its data
// intact or, when the operation had to give the stack up, with I/O errors;
// the other volume is untouched either way, and the server goes on.
func TestFailedVolumeContained(t *testing.T) {
	qemuIO := testcmd.Path(t, "qemu-io")
	const size, cluster = 8 << 20, 64 << 10
	srv := nbd.New(nbd.ServerOptions{})
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := nbd.ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
	}()
	uri := func(export string) string { return "nbd+unix:///" + export + "?socket=" + sock }
	io := func(export string, cmds ...string) (string, error) {
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		cctx, ccancel := context.WithTimeout(context.Background(), time.Minute)
		defer ccancel()
		out, err := exec.CommandContext(cctx, qemuIO, append(args, uri(export))...).CombinedOutput()
		return string(out), err
	}
	mustIO := func(export string, cmds ...string) {
		t.Helper()
		out, err := io(export, cmds...)
		if err != nil || strings.Contains(out, "error") || strings.Contains(out, "failed") {
			t.Fatalf("qemu-io on %s: %v\n%s", export, err, out)
		}
	}

	healthyDir := filepath.Join(t.TempDir(), "healthy")
	if err := InitStack(healthyDir, InitOptions{Size: size, ClusterSize: cluster}); err != nil {
		t.Fatal(err)
	}
	healthy := mustOpenStack(t, healthyDir, StackOptions{})
	defer healthy.Close()
	if err := srv.Add(nbd.Export{Name: "healthy", Backend: healthy}); err != nil {
		t.Fatal(err)
	}
	mustIO("healthy", "write -P 0x11 0 1M")

	for _, tc := range []struct {
		name, op, file string
		raw            bool
		run            func(s *Stack) error
		closes         bool
	}{
		{name: "snapshot", op: "rename", file: DescriptorName,
			run: func(s *Stack) error { _, _, err := s.Snapshot(); return err }},
		{name: "grow", op: "write", file: "root.hds",
			run: func(s *Stack) error { _, err := s.Grow(64 << 30); return err }},
		{name: "compact", op: "truncate", file: "root.hds",
			run: func(s *Stack) error { _, _, err := s.Compact(); return err }},
		{name: "grow-raw-top", op: "open", file: "root.hds", raw: true,
			run: func(s *Stack) error { _, err := s.Grow(2 * size); return err }, closes: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "failing")
			if err := InitStack(dir, InitOptions{Size: size, ClusterSize: cluster, RawBase: tc.raw}); err != nil {
				t.Fatal(err)
			}
			f := &faultAfter{op: tc.op, file: tc.file}
			s := mustOpenStack(t, dir, StackOptions{faults: f.fn})
			defer s.Close()
			name := "failing-" + tc.name
			if err := srv.Add(nbd.Export{Name: name, Backend: s}); err != nil {
				t.Fatal(err)
			}
			defer srv.Remove(context.Background(), name)
			mustIO(name, "write -P 0x22 0 2M", "write -z 2M 1M")
			f.armed.Store(true)
			err := tc.run(s)
			f.armed.Store(false)
			if err == nil {
				t.Fatal("the operation did not fail")
			}
			out, ioErr := io(name, "read -P 0x22 0 2M", "write -P 0x33 4M 64k")
			if tc.closes {
				if !strings.Contains(out, "Input/output error") {
					t.Fatalf("I/O on the given-up volume: %v\n%s\nwant I/O errors", ioErr, out)
				}
			} else if ioErr != nil || strings.Contains(out, "error") || strings.Contains(out, "failed") {
				t.Fatalf("I/O on the volume after a failed %s: %v\n%s", tc.name, ioErr, out)
			}
			// The other volume and the server are unaffected.
			mustIO("healthy", "read -P 0x11 0 1M", "write -P 0x44 1M 1M", "read -P 0x44 1M 1M")
		})
	}
}
