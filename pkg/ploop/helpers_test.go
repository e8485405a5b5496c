package ploop

import (
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// qemuCheck asserts that qemu-img agrees the image is clean.
func qemuCheck(t testing.TB, path string) {
	t.Helper()
	out, code := testcmd.Status(t, "qemu-img", "check", "-f", "parallels", path)
	if code == 3 && qemuEmptyImageLeakBug(t, path, out) {
		return
	}
	if code != 0 || !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check %s: exit %d:\n%s", path, code, out)
	}
}

// qemuEmptyImageLeakBug recognises a qemu-img 7.2 false positive: for an
// image with no allocated cluster it takes the used end to be one cluster,
// so an empty image whose BAT spans several clusters (qemu-img create makes
// such images itself) is reported as leaking the rest of its BAT. "Fixing"
// that would truncate the BAT. Our own Check must find the image clean.
func qemuEmptyImageLeakBug(t testing.TB, path, out string) bool {
	t.Helper()
	rep, err := Check(path)
	if err != nil || len(rep.Problems) != 0 || rep.AllocatedClusters != 0 {
		return false
	}
	if !strings.Contains(out, "leaked clusters were found") || strings.Contains(out, "ERROR out of range") ||
		!strings.Contains(out, fmt.Sprintf("Image end offset: %d", rep.ClusterSize)) {
		return false
	}
	t.Logf("qemu-img check reports its known false leak for an empty image with a %d-byte BAT area", rep.FileSize)
	return true
}

// qemuToRaw converts an image to raw with qemu-img and returns the bytes.
func qemuToRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "qemu.raw")
	testcmd.Run(t, "qemu-img", "convert", "-f", "parallels", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustCreate(t testing.TB, size, cluster int64) (*Image, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.hdd")
	img, err := Create(p, CreateOptions{Size: size, ClusterSize: cluster})
	if err != nil {
		t.Fatal(err)
	}
	return img, p
}

func mustOpen(t testing.TB, path string, opts OpenOptions) *Image {
	t.Helper()
	img, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// readAll reads the whole virtual disk.
func readAll(t testing.TB, img interface {
	Size() int64
	ReadAt([]byte, int64) (int, error)
}) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// randomBytes returns n bytes from rng; patterns differ per call so that
// misplaced data is caught.
func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// firstDiff describes where two byte slices first differ.
func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d and %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at offset %d (%#x vs %#x)", i, a[i], b[i])
		}
	}
	return "no difference"
}
