package catalog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
)

// testCtx is a context that ends before the test's deadline.
func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newCatalog opens a catalogue on a fresh root; it is closed at cleanup.
func newCatalog(t testing.TB, opts Options) (*Catalog, string) {
	t.Helper()
	root := t.TempDir()
	c, err := Open(root, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, root
}

// fastDir is a fresh directory on a tmpfs (/dev/shm) when there is one:
// the tests that take hundreds of snapshots or crash a child at every step
// spend their time in fsync, which costs nothing there and proves nothing
// more on a disk for a process crash.
func fastDir(t testing.TB) string {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs("/dev/shm", &st); err != nil || st.Type != 0x01021994 { // TMPFS_MAGIC
		return t.TempDir()
	}
	dir, err := os.MkdirTemp("/dev/shm", "catalog-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// newFastCatalog is newCatalog on a fastDir.
func newFastCatalog(t testing.TB, opts Options) *Catalog {
	t.Helper()
	c, err := Open(fastDir(t), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// reopen closes c and opens the root again (recovery runs).
func reopen(t testing.TB, c *Catalog, opts Options) *Catalog {
	t.Helper()
	c.Close()
	c2, err := Open(c.root, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c2.Close() })
	return c2
}

func mustCreate(t testing.TB, c *Catalog, req VolumeRequest) Volume {
	t.Helper()
	v, err := c.CreateVolume(testCtx(t), req)
	if err != nil {
		t.Fatalf("create %+v: %v", req, err)
	}
	return v
}

func mustSnapshot(t testing.TB, c *Catalog, name, vol string) Snapshot {
	t.Helper()
	s, err := c.CreateSnapshot(testCtx(t), name, vol)
	if err != nil {
		t.Fatalf("snapshot %s of %s: %v", name, vol, err)
	}
	return s
}

func wantErr(t testing.TB, err, class error, what string) {
	t.Helper()
	if !errors.Is(err, class) {
		t.Fatalf("%s: got %v, want an error wrapping %q", what, err, class)
	}
}

// pattern is recognisable data for (tag, offset).
func pattern(tag byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = tag ^ byte(i*7+i>>9)
	}
	return b
}

// writeVolume writes p at off through a writable open of the stack.
func writeVolume(t testing.TB, dir string, off int64, p []byte) {
	t.Helper()
	s, err := ploop.OpenStack(dir, ploop.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteAt(p, off); err != nil {
		s.Close()
		t.Fatal(err)
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// readVolume reads a whole stack.
func readVolume(t testing.TB, dir string) []byte {
	t.Helper()
	s, err := ploop.OpenStack(dir, ploop.StackOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b := make([]byte, s.Size())
	if _, err := s.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func depth(t testing.TB, dir string) int {
	t.Helper()
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	return len(d.Chain())
}

// qemuCheckStack runs qemu-img check on every ploop delta of a stack and
// our CheckStack on the directory.
func qemuCheckStack(t testing.TB, dir string) {
	t.Helper()
	testcmd.Need(t, "qemu-img")
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range d.Chain() {
		if im.Type != ploop.TypeCompressed {
			continue
		}
		p := filepath.Join(dir, im.File)
		if out := testcmd.Combined(t, "qemu-img", "check", "-f", "parallels", p); !strings.Contains(out, "No errors were found") {
			t.Fatalf("qemu-img check %s:\n%s", p, out)
		}
	}
	rep, err := ploop.CheckStack(dir)
	if err != nil || !rep.Clean() {
		t.Fatalf("check stack %s: %v\n%s", dir, err, rep)
	}
}

// treeHash hashes every name, type, mode, size, mtime and content under
// root, so that "nothing changed" can be asserted byte for byte.
func treeHash(t testing.TB, root string) string {
	t.Helper()
	h := sha256.New()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		sys := st.Sys().(*syscall.Stat_t)
		fmt.Fprintf(h, "%s %v %d %d.%d %d\n", p, st.Mode(), st.Size(), sys.Mtim.Sec, sys.Mtim.Nsec, sys.Nlink)
		if st.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			h.Write(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// listDir lists the names in dir.
func listDir(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// checkConsistent asserts that the root holds exactly what the records
// say: one stack per ready ploop volume and snapshot, no leftovers, every
// record ready, every stack consistent.
func checkConsistent(t testing.TB, c *Catalog) {
	t.Helper()
	c.mu.Lock()
	wantVols, wantSnaps := map[string]bool{}, map[string]bool{}
	for id, r := range c.vols {
		if r.State != stateReady {
			t.Errorf("volume %s is %s", id, r.State)
		}
		if r.Type == Ploop {
			wantVols[id] = true
		}
		if c.volByName[r.Name] != id {
			t.Errorf("volume %s: name %q not indexed", id, r.Name)
		}
	}
	for id, r := range c.snaps {
		if r.State != stateReady {
			t.Errorf("snapshot %s is %s", id, r.State)
		}
		if r.Type == Ploop {
			wantSnaps[id] = true
		}
		if c.snapByName[r.Name] != id {
			t.Errorf("snapshot %s: name %q not indexed", id, r.Name)
		}
	}
	c.mu.Unlock()
	for _, dir := range []struct {
		path string
		want map[string]bool
	}{{c.stacks(), wantVols}, {c.snapStacks(), wantSnaps}} {
		got := listDir(t, dir.path)
		if len(got) != len(dir.want) {
			t.Errorf("%s holds %v, records say %v", dir.path, got, dir.want)
		}
		for _, n := range got {
			if !dir.want[n] {
				t.Errorf("%s holds %s, which no record accounts for", dir.path, n)
				continue
			}
			rep, err := ploop.CheckStack(filepath.Join(dir.path, n))
			if err != nil || !rep.Clean() {
				t.Errorf("stack %s: %v\n%s", n, err, rep)
			}
		}
	}
	for _, n := range listDir(t, c.vrec.dir) {
		if strings.HasSuffix(n, tmpSuffix) {
			t.Errorf("leftover %s", n)
		}
	}
}

func equalData(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: data differs at byte %d (len %d vs %d)", what, i, len(got), len(want))
	}
}
