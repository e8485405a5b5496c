package nbd_test

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"golang.org/x/sys/unix"
)

// testAckedWriteSurvivesKill: a write the kernel got acknowledged, with
// no flush after it, must still read back after the server was killed
// and replaced: nothing crashed from the kernel's point of view, so
// the filesystem above may rely on it.
func testAckedWriteSurvivesKill(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	const id = "test-acked-write"
	h := startHelper(t, path, id, "connect")
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	copy(buf, pattern(7, 4096))
	f, err := os.OpenFile(h.dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	const off = 100 << 20 // an unallocated cluster: the write allocates it
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	h.cmd.Process.Signal(syscall.SIGKILL)
	h.cmd.Wait()
	h = startHelper(t, path, id, "reattach")
	f, err = os.OpenFile(h.dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	clear(buf)
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if !bytes.Equal(buf, pattern(7, 4096)) {
		t.Errorf("an acknowledged write was lost when the server was killed (read back %x...)", buf[:16])
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	if err := h.cmd.Wait(); err != nil {
		t.Fatalf("helper did not shut down cleanly: %v", err)
	}
}
