package serving

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ownedListener is a unix socket listener that removes its path on Close
// only while the path is still the socket it bound. A successor (a
// restarted server, a second serve of the same stack after this one let
// go of it) may have bound the same path meanwhile; removing that would
// leave the successor unreachable while it runs.
//
// Whether the path is still ours is the socket file's device and inode,
// recorded at bind. The inode cannot be reused while our listener is
// open, so the comparison is exact as long as Close compares before it
// closes. The remaining race, a successor renaming its socket into place
// between our comparison and our unlink, is closed by a lock file next to
// the socket (path + ".lock"): binding (the rename into place) and the
// compare-and-unlink both run under it. The lock file is never removed,
// since removing a lock file races with its next user.
type ownedListener struct {
	*net.UnixListener
	path     string
	dev, ino uint64
}

// listenOwned listens on a unix socket at path that only the owner can
// connect to (mode 0600). The socket is bound inside a private temporary
// directory, restricted, and only then renamed into place, so there is no
// moment at which others could connect. An existing socket at path (a
// stale one, or a predecessor's) is replaced; any other file is an error.
func listenOwned(path string) (*ownedListener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() != os.ModeSocket {
		return nil, fmt.Errorf("listen on %s: exists and is not a socket", path)
	}
	unlock, err := lockSocketPath(path)
	if err != nil {
		return nil, err
	}
	defer unlock()
	dir, err := os.MkdirTemp(filepath.Dir(path), ".ctl-")
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("restrict %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(tmp, &st); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// Checked again under the lock: a file created since the first look
	// must not be replaced either.
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() != os.ModeSocket {
		l.Close()
		return nil, fmt.Errorf("listen on %s: exists and is not a socket", path)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return &ownedListener{UnixListener: l, path: path, dev: st.Dev, ino: st.Ino}, nil
}

// Close removes the socket if the path still names it, then closes the
// listener.
func (l *ownedListener) Close() error {
	var errs []error
	unlock, err := lockSocketPath(l.path)
	if err != nil {
		errs = append(errs, err)
	} else {
		var st unix.Stat_t
		switch err := unix.Lstat(l.path, &st); {
		case err == nil && st.Dev == l.dev && st.Ino == l.ino:
			if err := os.Remove(l.path); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		case err != nil && !errors.Is(err, unix.ENOENT):
			errs = append(errs, fmt.Errorf("stat %s: %w", l.path, err))
		}
		unlock()
	}
	errs = append(errs, l.UnixListener.Close())
	return errors.Join(errs...)
}

// lockSocketPath takes the lock that serialises binding path with
// removing it. It blocks only for the few system calls another process
// spends in the same critical section.
func lockSocketPath(path string) (func(), error) {
	lock := path + ".lock"
	f, err := os.OpenFile(lock, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", lock, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", lock, err)
	}
	// Closing the file releases the lock.
	return func() { f.Close() }, nil
}
