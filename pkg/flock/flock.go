// Package flock takes flock(2) locks that tell a process which really holds
// a file from a forked child's passing copy of the lock.
//
// A flock belongs to the open file, which every descriptor of it shares,
// and fork gives the child a copy of every descriptor, which it keeps until
// it execs (O_CLOEXEC closes them only then). So a process that closes a
// locked file and opens it again at once, while any of its goroutines
// starts a program (the node plugin runs mkfs and mount; tests run
// qemu-img), can find its own lock still held for that moment. A
// non-blocking flock would then report a holder that does not exist;
// these functions retry for a bound far longer than that moment and far
// shorter than any real holder keeps a file.
package flock

import (
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Wait is how long Exclusive waits for a holder to let go.
const Wait = 2 * time.Second

// Exclusive takes an exclusive flock on f, waiting up to Wait while it is
// held elsewhere. The error of a lock still held then wraps EWOULDBLOCK.
func Exclusive(f *os.File) error { return Within(f, unix.LOCK_EX, Wait, nil) }

// Within takes the flock how (unix.LOCK_EX or unix.LOCK_SH), retrying
// while it is held elsewhere for up to wait; busy, when set, is called
// after each refused attempt (tests release the holder there).
func Within(f *os.File, how int, wait time.Duration, busy func()) error {
	deadline := time.Now().Add(wait)
	pause := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case err == unix.EINTR:
			continue
		case err == unix.EWOULDBLOCK && time.Now().Before(deadline):
			if busy != nil {
				busy()
			}
			time.Sleep(pause)
			pause = min(2*pause, 100*time.Millisecond)
			continue
		}
		return &os.PathError{Op: "flock", Path: f.Name(), Err: err}
	}
}
