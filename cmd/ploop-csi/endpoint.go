package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// maxSocketPath is what fits in sockaddr_un.sun_path with its NUL.
const maxSocketPath = 107

// parseEndpoint returns the socket path of a CSI endpoint. Only unix
// sockets are accepted ("unix:///csi/csi.sock" or "unix:/csi/csi.sock"):
// the driver never opens a network port.
func parseEndpoint(ep string) (string, error) {
	var p string
	switch {
	case strings.HasPrefix(ep, "unix://"):
		p = ep[len("unix://"):]
	case strings.HasPrefix(ep, "unix:"):
		p = ep[len("unix:"):]
	default:
		return "", fmt.Errorf("endpoint %q: only unix sockets are served (unix:///path/to/csi.sock); the driver opens no network port", ep)
	}
	switch {
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return "", fmt.Errorf("endpoint %q: the socket path must be absolute and clean (unix:///path/to/csi.sock)", ep)
	case len(p) > maxSocketPath:
		return "", fmt.Errorf("endpoint %q: the socket path is %d bytes long; a unix socket path has at most %d", ep, len(p), maxSocketPath)
	case strings.ContainsRune(p, 0):
		return "", fmt.Errorf("endpoint %q: the socket path contains a NUL byte", ep)
	}
	return p, nil
}

// listenUnix listens on a unix socket at path that only this user can
// connect to (0600) from the first instant: the socket is made in a fresh
// 0700 directory beside path, its mode set, and then renamed into place. A
// stale socket at path (nobody answering) is replaced; anything else there
// is left alone and is an error. close stops listening and removes the
// socket if it is still ours.
func listenUnix(path string) (l net.Listener, closeFn func() error, err error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != os.ModeSocket {
			return nil, nil, fmt.Errorf("listen on %s: it exists and is not a socket (%s); refusing to replace it", path, st.Mode().Type())
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, derr := (&net.Dialer{}).DialContext(ctx, "unix", path)
		cancel()
		if derr == nil {
			c.Close()
			return nil, nil, fmt.Errorf("listen on %s: another process is serving it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, nil, fmt.Errorf("listen on %s: remove the stale socket: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".csi")
	if err != nil {
		return nil, nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	defer os.Remove(tmp)
	tp := filepath.Join(tmp, "s")
	if len(tp) > maxSocketPath {
		return nil, nil, fmt.Errorf("listen on %s: the directory's path is too long for a unix socket (%s)", path, tp)
	}
	ln, err := net.Listen("unix", tp)
	if err != nil {
		return nil, nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ul := ln.(*net.UnixListener)
	// The socket moves: its path is removed by close below, not by Go.
	ul.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, func() error, error) {
		ul.Close()
		os.Remove(tp)
		return nil, nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(tp, 0o600); err != nil {
		return fail(err)
	}
	st, err := os.Lstat(tp)
	if err != nil {
		return fail(err)
	}
	if err := os.Rename(tp, path); err != nil {
		return fail(err)
	}
	closeFn = func() error {
		err := ul.Close()
		if errors.Is(err, net.ErrClosed) {
			err = nil // the gRPC server closed it when it stopped
		}
		// Remove the socket only while it is the one we made: a newer
		// instance may already have replaced it.
		if now, serr := os.Lstat(path); serr == nil && os.SameFile(now, st) {
			if rerr := os.Remove(path); rerr != nil && err == nil {
				err = rerr
			}
		}
		return err
	}
	return renamedListener{ul, &net.UnixAddr{Name: path, Net: "unix"}}, closeFn, nil
}

// renamedListener reports the path its socket was renamed to.
type renamedListener struct {
	*net.UnixListener
	addr net.Addr
}

func (l renamedListener) Addr() net.Addr { return l.addr }
