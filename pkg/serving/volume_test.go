package serving

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// newStack makes a stack directory of size bytes with 64 KiB clusters.
func newStack(t *testing.T, size int64) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vol")
	if err := ploop.InitStack(dir, ploop.InitOptions{Size: size, ClusterSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func newImage(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: size, ClusterSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func newRaw(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

func open(t *testing.T, path string, opts OpenOptions) *Volume {
	t.Helper()
	v, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close(context.Background()) })
	return v
}

func readAt(t *testing.T, v *Volume, n int, off int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := v.disk.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOpenKinds: Open tells stacks, ploop images and raw files apart, and
// only a writable stack takes online operations and a control socket.
func TestOpenKinds(t *testing.T) {
	const size = 4 << 20
	for _, tc := range []struct {
		name     string
		path     func(*testing.T) string
		readOnly bool
		kind     Kind
		online   bool
	}{
		{"stack", func(t *testing.T) string { return newStack(t, size) }, false, KindStack, true},
		{"read-only stack", func(t *testing.T) string { return newStack(t, size) }, true, KindStack, false},
		{"ploop image", func(t *testing.T) string { return newImage(t, size) }, false, KindPloop, false},
		{"raw file", func(t *testing.T) string { return newRaw(t, size) }, false, KindRaw, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := open(t, tc.path(t), OpenOptions{ReadOnly: tc.readOnly})
			if v.Kind() != tc.kind || v.Size() != size || v.ReadOnly() != tc.readOnly {
				t.Fatalf("kind %s size %d read-only %v; want %s %d %v", v.Kind(), v.Size(), v.ReadOnly(), tc.kind, size, tc.readOnly)
			}
			if (v.Stack() != nil) != (tc.kind == KindStack) {
				t.Fatalf("Stack() = %v for a %s", v.Stack(), tc.kind)
			}
			_, _, err := v.Snapshot()
			if tc.online {
				if err != nil {
					t.Fatalf("snapshot of a writable stack: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrNotStack) {
				t.Errorf("snapshot: %v, want ErrNotStack", err)
			}
			if err := v.ServeControl(filepath.Join(t.TempDir(), "c.sock")); !errors.Is(err, ErrNotStack) {
				t.Errorf("control socket: %v, want ErrNotStack", err)
			}
		})
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing"), OpenOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("open of a missing path: %v", err)
	}
}

// TestOnlineOps runs each online operation on an open stack and checks
// the volume's contents and size.
func TestOnlineOps(t *testing.T) {
	dir := newStack(t, 4<<20)
	v := open(t, dir, OpenOptions{})
	if _, err := v.disk.WriteAt(pattern(0x11, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	guid, _, err := v.Snapshot()
	if err != nil || !ploop.ValidGUID(guid) {
		t.Fatalf("snapshot: %q, %v", guid, err)
	}
	// Overwrite, then discard half, so that compaction has work.
	if _, err := v.disk.WriteAt(pattern(0x22, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := v.disk.Discard(1<<20, 512<<10); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Grow(8 << 20); err != nil {
		t.Fatal(err)
	}
	if v.Size() != 8<<20 {
		t.Fatalf("size after grow: %d", v.Size())
	}
	if _, err := v.DeleteSnapshot("not-a-guid"); err == nil {
		t.Fatal("delete of a malformed GUID succeeded")
	}
	if _, err := v.DeleteSnapshot(guid); err != nil {
		t.Fatal(err)
	}
	if v.Stack().Depth() != 1 {
		t.Fatalf("depth %d after deleting the only snapshot", v.Stack().Depth())
	}
	if _, _, err := v.Compact(); err != nil {
		t.Fatal(err)
	}
	want := append(pattern(0x11, 1<<20), make([]byte, 512<<10)...)
	want = append(want, pattern(0x22, 512<<10)...)
	if got := readAt(t, v, 2<<20, 0); !bytes.Equal(got, want) {
		t.Fatal("contents changed by the online operations")
	}
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rep, err := ploop.CheckStack(dir); err != nil || !rep.Clean() {
		t.Fatalf("stack after close: %v\n%s", err, rep)
	}
}

// TestClosedVolume: a closed volume refuses everything with os.ErrClosed,
// and Close and Release stay idempotent.
func TestClosedVolume(t *testing.T) {
	v := open(t, newStack(t, 1<<20), OpenOptions{})
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "nbd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"snapshot": func() error { _, _, err := v.Snapshot(); return err }(),
		"grow":     func() error { _, err := v.Grow(2 << 20); return err }(),
		"compact":  func() error { _, _, err := v.Compact(); return err }(),
		"attach":   v.Attach(context.Background(), nil, AttachOptions{BackendID: "x"}),
		"serve":    v.Serve(context.Background(), l, "x"),
	} {
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("%s after Close: %v, want os.ErrClosed", name, err)
		}
	}
	if _, err := l.Accept(); err == nil {
		t.Error("Serve of a closed volume left its listener open")
	}
	if err := v.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := v.Release(); err != nil {
		t.Errorf("Release after Close: %v", err)
	}
	if v.Device() != "" || v.Gone() != nil {
		t.Errorf("a closed volume reports device %q", v.Device())
	}
}

// TestRepairAfterKill: a process that had the volume open is SIGKILLed
// after writing (without a flush). The volume is then marked in use, so a
// plain Open refuses it; Open with Repair fixes the mark and the write is
// there. While the process lives, Repair refuses and changes nothing.
func TestRepairAfterKill(t *testing.T) {
	for _, tc := range []struct {
		name string
		path func(*testing.T) string
	}{
		{"stack", func(t *testing.T) string { return newStack(t, 4<<20) }},
		{"stack with a snapshot", func(t *testing.T) string {
			dir := newStack(t, 4<<20)
			if _, err := ploop.Snapshot(dir); err != nil {
				t.Fatal(err)
			}
			return dir
		}},
		{"ploop image", func(t *testing.T) string { return newImage(t, 4<<20) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.path(t)
			holder := startHolder(t, path)
			if _, err := Open(path, OpenOptions{Repair: true}); err == nil {
				t.Fatal("Open with Repair succeeded while another process has the volume open")
			}
			holder.Process.Signal(syscall.SIGKILL)
			holder.Wait()
			if v, err := Open(path, OpenOptions{}); !errors.Is(err, ploop.ErrInUse) {
				if err == nil {
					v.Close(context.Background())
				}
				t.Fatalf("Open after the kill: %v, want ploop.ErrInUse", err)
			}
			v := open(t, path, OpenOptions{Repair: true})
			if got := readAt(t, v, 64<<10, 0); !bytes.Equal(got, pattern(0x5a, 64<<10)) {
				t.Fatal("the write acknowledged before the kill is gone")
			}
			if err := v.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			// Closed cleanly: a plain Open works again.
			open(t, path, OpenOptions{})
		})
	}
}
