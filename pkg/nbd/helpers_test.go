package nbd

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// fileBackend is a raw sparse file, the simplest real Backend: holes are
// found with SEEK_DATA/SEEK_HOLE and released with FALLOC_FL_PUNCH_HOLE.
type fileBackend struct {
	f        *os.File
	readOnly bool
	mu       sync.Mutex
	flushes  int
}

func openFileBackend(t testing.TB, path string, readOnly bool) *fileBackend {
	t.Helper()
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileBackend{f: f, readOnly: readOnly}
}

func newFileBackend(t testing.TB, size int64) (*fileBackend, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return openFileBackend(t, path, false), path
}

func (b *fileBackend) Size() int64 {
	fi, err := b.f.Stat()
	if err != nil {
		return 0
	}
	return fi.Size()
}
func (b *fileBackend) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *fileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *fileBackend) ReadOnly() bool                           { return b.readOnly }
func (b *fileBackend) Flush() error {
	b.mu.Lock()
	b.flushes++
	b.mu.Unlock()
	return b.f.Sync()
}
func (b *fileBackend) Discard(off, length int64) error {
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}
func (b *fileBackend) WriteZeroes(off, length int64, noHole bool) error {
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if noHole {
		mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
	}
	return unix.Fallocate(int(b.f.Fd()), mode, off, length)
}
func (b *fileBackend) Extent(off, length int64) (int64, bool, error) {
	fd := int(b.f.Fd())
	data, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) { // no data after off
		return length, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	if data > off {
		return min(data-off, length), false, nil
	}
	hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
	if err != nil {
		return 0, false, err
	}
	return min(hole-off, length), true, nil
}

// serveUnix serves exports on a fresh unix socket until the test ends and
// returns the socket path.
func serveUnix(t testing.TB, exports ...Export) string {
	t.Helper()
	srv, err := NewServer(exports...)
	if err != nil {
		t.Fatal(err)
	}
	return serveServer(t, srv)
}

func nbdURI(sock, export string) string {
	return "nbd+unix:///" + export + "?socket=" + sock
}

func writeRandom(t testing.TB, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := os.Open("/dev/urandom")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := io.CopyN(f, r, size); err != nil {
		t.Fatal(err)
	}
}
