package nbd

import (
	"bytes"
	"errors"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
)

// failingBackend fails the method named by fail with EIO.
type failingBackend struct {
	*splicingBackend
	fail string
}

var errInjected = &os.PathError{Op: "injected", Path: "disk", Err: syscall.EIO}

func (f *failingBackend) ReadAt(b []byte, off int64) (int, error) {
	if f.fail == "ReadAt" {
		return 0, errInjected
	}
	return f.splicingBackend.ReadAt(b, off)
}
func (f *failingBackend) ReadFile(off, n int64, piece func(*os.File, int64, int64) error) error {
	if f.fail == "ReadFile" {
		return errInjected
	}
	return f.splicingBackend.ReadFile(off, n, piece)
}
func (f *failingBackend) WriteAt(b []byte, off int64) (int, error) {
	if f.fail == "WriteAt" {
		return 0, errInjected
	}
	return f.splicingBackend.WriteAt(b, off)
}
func (f *failingBackend) Flush() error {
	if f.fail == "Flush" {
		return errInjected
	}
	return f.splicingBackend.Flush()
}
func (f *failingBackend) Discard(off, n int64) error {
	if f.fail == "Discard" {
		return errInjected
	}
	return f.splicingBackend.Discard(off, n)
}

// TestIOErrorsReported: every error a backend returns for a request, in
// every request path a real client reaches, is passed to the export's
// OnIOError (the node plugin counts them) besides going to the client.
func TestIOErrorsReported(t *testing.T) {
	testcmd.Need(t, "qemu-io")
	tests := []struct {
		method  string
		trigger []string
	}{
		{"WriteAt", []string{"-c", "write -P 0x33 0 64k"}},
		{"ReadAt", []string{"-c", "read 0 4k"}},
		{"ReadFile", []string{"-c", "read 0 512k"}},
		{"Flush", []string{"-c", "flush"}},
		{"Discard", []string{"-c", "discard 0 64k"}},
		{"none", []string{"-c", "write 0 4k", "-c", "read 0 512k", "-c", "flush"}},
	}
	for _, tc := range tests {
		t.Run(tc.method, func(t *testing.T) {
			fb, _ := newFileBackend(t, 8<<20)
			if _, err := fb.WriteAt(bytes.Repeat([]byte{0x77}, 1<<20), 0); err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			var got []error
			srv := New(ServerOptions{})
			b := &failingBackend{splicingBackend: &splicingBackend{fileBackend: fb, size: 8 << 20}, fail: tc.method}
			if err := srv.Add(Export{Name: "disk", Backend: b, OnIOError: func(err error) {
				mu.Lock()
				got = append(got, err)
				mu.Unlock()
			}}); err != nil {
				t.Fatal(err)
			}
			sock := serveServer(t, srv)
			out, ok := runQuiet("qemu-io", append(append([]string{"-f", "raw"}, tc.trigger...), nbdURI(sock, "disk"))...)
			mu.Lock()
			defer mu.Unlock()
			if tc.method == "none" {
				if !ok || len(got) != 0 {
					t.Fatalf("no failure injected, yet qemu-io ok=%t, errors reported %v:\n%s", ok, got, out)
				}
				return
			}
			if ok {
				t.Errorf("qemu-io succeeded although %s failed:\n%s", tc.method, out)
			}
			if len(got) == 0 || !errors.Is(got[0], syscall.EIO) {
				t.Fatalf("OnIOError got %v, want the backend's EIO", got)
			}
		})
	}
}
