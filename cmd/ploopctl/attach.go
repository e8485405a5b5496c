package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
	"golang.org/x/sys/unix"
)

// runDir holds one pid file per device served by `ploopctl attach`, so
// that `ploopctl detach /dev/nbdN` can find the process to stop.
const runDir = "/run/ploopctl"

func pidFile(index int) string {
	return filepath.Join(runDir, "nbd"+strconv.Itoa(index)+".pid")
}

func runAttach(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("attach", flag.ContinueOnError)
	fs.SetOutput(stderr)
	conns := fs.Int("connections", 1, "number of kernel connections (`N`); with more than one the kernel resends a request slower than 30 s on another connection (the server keeps that safe)")
	mountDir := fs.String("mount", "", "mount the filesystem on the device at `DIR`")
	readOnly := fs.Bool("read-only", false, "attach read-only")
	direct := fs.Bool("direct", false, "open the image with O_DIRECT (no double caching)")
	id := fs.String("id", "", "backend identifier shown in /sys/block/nbdN/backend (default: the image's absolute path)")
	device := fs.String("device", "", "use this `/dev/nbdN` instead of any free device")
	timeout := fs.Duration("timeout", 0, "the kernel's per-request timeout, whole seconds (0: pkg/nbd's default)")
	deadConn := fs.Duration("dead-conn-timeout", 0, "how long the kernel holds I/O while this process is gone, waiting for\n`attach --reattach`; whole seconds (0: pkg/nbd's default)")
	reattach := fs.Bool("reattach", false, "take over the device of a killed attach with the same --id (see above)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: ploopctl attach [--connections N] [--mount DIR] [--read-only] [--direct] [--id ID] [--device /dev/nbdN]")
		fmt.Fprintln(stderr, "                      [--timeout D] [--dead-conn-timeout D] [--reattach] IMAGE|DIR")
		fmt.Fprintln(stderr, "Serves the image to a kernel nbd device and prints its path as the first line of stdout;")
		fmt.Fprintln(stderr, "keeps serving until SIGINT, SIGTERM or `ploopctl detach`, then unmounts, disconnects and closes.")
		fmt.Fprintln(stderr, "A stack DIR is served whole and takes online snapshot, snapshot-delete, grow and compact")
		fmt.Fprintln(stderr, "requests on DIR/"+serving.ControlName+" (the grow also resizes the device).")
		fmt.Fprintln(stderr, "When an attach is killed, the kernel keeps its device, with the filesystem on it mounted, and")
		fmt.Fprintln(stderr, "holds its I/O for --dead-conn-timeout. `ploopctl attach --reattach --id ID IMAGE|DIR` then")
		fmt.Fprintln(stderr, "repairs the image (the in-use mark, an interrupted online operation), reopens it, finds the")
		fmt.Fprintln(stderr, "device whose backend is ID and gives the kernel fresh connections: no I/O error reaches the")
		fmt.Fprintln(stderr, "filesystem. It takes the --timeout and --dead-conn-timeout of the first attach; --mount does not apply.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() != 1 || *conns < 1 || *conns > 64 {
		fmt.Fprintln(stderr, "ploopctl attach: need one IMAGE and 1 <= --connections <= 64")
		fs.Usage()
		return exitUsage
	}
	for name, d := range map[string]time.Duration{"--timeout": *timeout, "--dead-conn-timeout": *deadConn} {
		// The kernel counts in seconds.
		if d < 0 || d%time.Second != 0 {
			fmt.Fprintf(stderr, "ploopctl attach: %s %v: need whole seconds\n", name, d)
			fs.Usage()
			return exitUsage
		}
	}
	if *reattach && *mountDir != "" {
		fmt.Fprintln(stderr, "ploopctl attach: --reattach keeps the filesystem that is mounted already; drop --mount")
		fs.Usage()
		return exitUsage
	}
	if *device != "" {
		if _, err := nbd.ParseDevice(*device); err != nil {
			fmt.Fprintf(stderr, "ploopctl attach: %v\n", err)
			return exitUsage
		}
	}
	path, err := filepath.Abs(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(stderr, "ploopctl attach: %v\n", err)
		return exitFail
	}
	if *id == "" {
		*id = path
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// A killed predecessor left the top delta marked in use.
	vol, err := serving.Open(path, serving.OpenOptions{ReadOnly: *readOnly, Direct: *direct, Repair: *reattach})
	if err != nil {
		fmt.Fprintf(stderr, "ploopctl attach: %v\n", err)
		return exitFail
	}
	status := exitOK
	report := func(err error) {
		if err != nil {
			fmt.Fprintf(stderr, "ploopctl attach: %v\n", err)
			status = exitFail
		}
	}
	k, err := nbd.OpenKernel()
	if err != nil {
		report(err)
		report(vol.Close(context.Background()))
		return status
	}
	defer k.Close()
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		report(vol.Close(dctx))
	}()
	opts := serving.AttachOptions{
		BackendID: *id, Device: *device, Connections: *conns,
		Timeout: *timeout, DeadConnTimeout: *deadConn,
	}
	if *reattach {
		// The kernel found the old connections dead when the killed
		// process's sockets closed; a minute is ample.
		actx, cancel := context.WithTimeout(ctx, time.Minute)
		err = vol.Reattach(actx, k, opts)
		cancel()
	} else {
		err = vol.Attach(ctx, k, opts)
	}
	if err != nil {
		report(err)
		return status
	}
	dev := vol.Device()
	if vol.Kind() == serving.KindStack && !*readOnly {
		if err := vol.ServeControl(""); err != nil {
			report(err)
			return status
		}
	}
	index, _ := nbd.ParseDevice(dev)
	if err := writePidFile(index); err != nil {
		report(err)
		return status
	}
	defer os.Remove(pidFile(index))
	if *mountDir != "" {
		opts := "rw"
		if *readOnly {
			opts = "ro"
		}
		if out, err := exec.Command("mount", "-o", opts, dev, *mountDir).CombinedOutput(); err != nil {
			report(fmt.Errorf("mount %s on %s: %v: %s", dev, *mountDir, err, strings.TrimSpace(string(out))))
			return status
		}
		defer func() {
			if err := unix.Unmount(*mountDir, 0); err != nil {
				report(fmt.Errorf("unmount %s: %w", *mountDir, err))
			}
		}()
	}
	fmt.Fprintln(stdout, dev)
	select {
	case <-ctx.Done():
	case <-vol.Gone():
		report(fmt.Errorf("%s was disconnected by someone else", dev))
	}
	return status
}

func writePidFile(index int) error {
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(pidFile(index), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
}
