package nbd

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// ListenUnix listens on a unix socket at path that only the owner can
// connect to (mode 0600). The socket is bound inside a private temporary
// directory, restricted, and only then renamed into place, so there is no
// moment at which others could connect. An existing socket at path is
// replaced; any other existing file is an error. Closing the listener
// removes the socket.
func ListenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() != os.ModeSocket {
		return nil, fmt.Errorf("nbd: listen on %s: exists and is not a socket", path)
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".nbd-")
	if err != nil {
		return nil, fmt.Errorf("nbd: listen on %s: %w", path, err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("nbd: listen on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("nbd: restrict %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return nil, fmt.Errorf("nbd: listen on %s: %w", path, err)
	}
	return &unixListener{UnixListener: l, path: path}, nil
}

type unixListener struct {
	*net.UnixListener
	path string
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	if rerr := os.Remove(l.path); rerr != nil && !os.IsNotExist(rerr) && err == nil {
		err = rerr
	}
	return err
}
