package flock

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestOutlastsAForkedCopy: a forked child holds a copy of every open
// descriptor until it execs, and with it the image's flock. An image
// closed and opened again at once must wait for that copy to go, not
// fail; an image that another descriptor really holds still fails.
func TestOutlastsAForkedCopy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	holder, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(holder.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	// The copy a fork makes shares the open file, and so the lock.
	fd, err := unix.Dup(int(holder.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	holder.Close()

	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	busy := 0
	err = Within(f, unix.LOCK_EX, time.Minute, func() {
		if busy++; busy == 1 {
			unix.Close(fd) // the child execs
		}
	})
	if err != nil || busy == 0 {
		t.Fatalf("flock after the copy went: %v (refused %d times)", err, busy)
	}

	other, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	t0 := time.Now()
	if err := Within(other, unix.LOCK_EX, 50*time.Millisecond, nil); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("flock held by another open file: %v, want EWOULDBLOCK", err)
	}
	if d := time.Since(t0); d > 10*time.Second {
		t.Errorf("a refused flock took %v, bound 50ms", d)
	}
}
