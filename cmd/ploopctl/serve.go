package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
)

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
		fmt.Fprintln(stderr, "A stack DIR is served whole; while it is served, `ploopctl snapshot`, `snapshot-delete`, `grow`")
		fmt.Fprintln(stderr, "and `compact` on DIR run in this process through the control socket DIR/"+serving.ControlName+" (mode 0600).")
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

	vol, err := serving.Open(path, serving.OpenOptions{ReadOnly: *readOnly, Direct: *direct})
	if err != nil {
		fmt.Fprintf(stderr, "ploopctl serve: %v\n", err)
		return exitFail
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "ploopctl serve: %v\n", err)
		if cerr := vol.Close(context.Background()); cerr != nil {
			fmt.Fprintf(stderr, "ploopctl serve: %v\n", cerr)
		}
		return exitFail
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
	// A served stack takes the online operations on its control socket.
	if vol.Kind() == serving.KindStack && !*readOnly {
		if err := vol.ServeControl(""); err != nil {
			l.Close()
			return fail(err)
		}
	}
	fmt.Fprintln(stdout, uri)
	if err := vol.Serve(ctx, l, name); err != nil {
		return fail(err)
	}
	if err := vol.Close(context.Background()); err != nil {
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
