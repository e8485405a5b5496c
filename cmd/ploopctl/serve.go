package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// image is what the serving verbs open: a ploop image or a raw file.
type image interface {
	nbd.Backend
	Close() error
}

// openImage opens path as a ploop image when it starts with a ploop
// header signature, and as a raw file otherwise.
// A stack directory (with a DiskDescriptor.xml) opens as the whole stack.
func openImage(path string, readOnly, direct bool) (image, string, error) {
	if ploop.IsStackDir(path) {
		st, err := ploop.OpenStack(path, ploop.StackOptions{ReadOnly: readOnly, Direct: direct})
		if err != nil {
			return nil, "", err
		}
		return st, "stack", nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, "", err
	}
	hdr := make([]byte, ploop.HeaderSize)
	n, err := io.ReadFull(f, hdr)
	f.Close()
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, "", fmt.Errorf("read %s: %w", path, err)
	}
	if _, perr := ploop.ParseHeader(hdr[:n]); !errors.Is(perr, ploop.ErrNotPloop) {
		// A ploop signature with a bad header is reported by Open.
		img, err := ploop.Open(path, ploop.OpenOptions{ReadOnly: readOnly, Direct: direct})
		if err != nil {
			return nil, "", err
		}
		return img, "ploop", nil
	}
	raw, err := ploop.OpenRawWith(path, ploop.OpenOptions{ReadOnly: readOnly, Direct: direct})
	if err != nil {
		return nil, "", err
	}
	return raw, "raw", nil
}

// closeImage flushes and closes, reporting the first error.
func closeImage(img image) error {
	err := img.Flush()
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return err
}

func runServe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "serve on a unix socket at `PATH` (mode 0600)")
	listen := fs.String("listen", "", "serve on TCP `ADDR` (host:port; an empty host means 127.0.0.1; a non-loopback host needs --allow-remote)")
	allowRemote := fs.Bool("allow-remote", false, "let --listen use a non-loopback address: anyone who can reach it can read and write the image")
	readOnly := fs.Bool("read-only", false, "refuse writes")
	export := fs.String("export", "", "export `NAME` (default: the image file's base name)")
	direct := fs.Bool("direct", false, "open the image with O_DIRECT")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: ploopctl serve [--socket PATH | --listen ADDR [--allow-remote]] [--read-only] [--export NAME] [--direct] IMAGE|RAW|DIR")
		fmt.Fprintln(stderr, "Serves the image over NBD until SIGINT or SIGTERM, then flushes and closes it.")
		fmt.Fprintln(stderr, "The first line of stdout is the NBD URI, printed once the server accepts connections.")
		fmt.Fprintln(stderr, "A stack DIR is served whole; while it is served, `ploopctl snapshot`, `snapshot-delete` and")
		fmt.Fprintln(stderr, "`grow` on DIR run in this process through the control socket DIR/"+controlName+" (mode 0600).")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() != 1 || (*socket == "") == (*listen == "") {
		fmt.Fprintln(stderr, "ploopctl serve: need one IMAGE and exactly one of --socket or --listen")
		fs.Usage()
		return exitUsage
	}
	var addr string
	if *listen != "" {
		var err error
		if addr, err = listenAddr(*listen, *allowRemote); err != nil {
			fmt.Fprintf(stderr, "ploopctl serve: %v\n", err)
			return exitUsage
		}
	}
	path := fs.Arg(0)
	name := *export
	if name == "" {
		name = filepath.Base(path)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	img, kind, err := openImage(path, *readOnly, *direct)
	if err != nil {
		fmt.Fprintf(stderr, "ploopctl serve: %v\n", err)
		return exitFail
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "ploopctl serve: %v\n", err)
		if cerr := closeImage(img); cerr != nil {
			fmt.Fprintf(stderr, "ploopctl serve: %v\n", cerr)
		}
		return exitFail
	}
	srv, err := nbd.NewServer(nbd.Export{Name: name, Description: kind + " image " + path, Backend: img, ReadOnly: *readOnly})
	if err != nil {
		return fail(err)
	}
	var l net.Listener
	var uri string
	if *socket != "" {
		l, err = nbd.ListenUnix(*socket)
		uri = "nbd+unix:///" + name + "?socket=" + *socket
	} else {
		if l, err = net.Listen("tcp", addr); err == nil {
			uri = "nbd://" + l.Addr().String() + "/" + name
			if !isLoopback(addr) {
				fmt.Fprintf(stderr, "ploopctl serve: WARNING: NBD has no authentication or encryption: anyone who can reach %s can read and write %s\n", l.Addr(), path)
			}
		}
	}
	if err != nil {
		return fail(err)
	}
	// A served stack takes snapshot, snapshot-delete and grow requests
	// on its control socket (control.go).
	var ctl *controlServer
	if st, ok := img.(*ploop.Stack); ok && !*readOnly {
		if ctl, err = startControl(st, nil); err != nil {
			l.Close()
			return fail(err)
		}
	}
	fmt.Fprintln(stdout, uri)
	err = srv.Serve(ctx, l)
	if ctl != nil {
		if cerr := ctl.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		return fail(err)
	}
	if err := closeImage(img); err != nil {
		fmt.Fprintf(stderr, "ploopctl serve: %v\n", err)
		return exitFail
	}
	return exitOK
}

// listenAddr is the TCP address --listen serves on. NBD has no
// authentication, so a host that is not loopback is refused unless
// allowRemote.
func listenAddr(listen string, allowRemote bool) (string, error) {
	addr, err := loopbackDefault(listen)
	if err != nil {
		return "", err
	}
	if !allowRemote && !isLoopback(addr) {
		return "", fmt.Errorf("--listen %q: not a loopback address; NBD has no authentication, so serving beyond this host needs --allow-remote", listen)
	}
	return addr, nil
}

// isLoopback reports whether addr's host is "localhost" or a loopback
// IP. Other names are not resolved: what they point to can change.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// loopbackDefault fills in 127.0.0.1 when addr has no host, so that a
// bare ":10809" never exposes an image to the network.
func loopbackDefault(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("--listen %q: %w", addr, err)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}
