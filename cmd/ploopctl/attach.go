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
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
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
	conns := fs.Int("connections", 4, "number of kernel connections (`N`)")
	mountDir := fs.String("mount", "", "mount the filesystem on the device at `DIR`")
	readOnly := fs.Bool("read-only", false, "attach read-only")
	direct := fs.Bool("direct", false, "open the image with O_DIRECT (no double caching)")
	id := fs.String("id", "", "backend identifier shown in /sys/block/nbdN/backend (default: the image's absolute path)")
	device := fs.String("device", "", "use this `/dev/nbdN` instead of any free device")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: ploopctl attach [--connections N] [--mount DIR] [--read-only] [--direct] [--id ID] [--device /dev/nbdN] IMAGE|DIR")
		fmt.Fprintln(stderr, "Serves the image to a kernel nbd device and prints its path as the first line of stdout;")
		fmt.Fprintln(stderr, "keeps serving until SIGINT, SIGTERM or `ploopctl detach`, then unmounts, disconnects and closes.")
		fmt.Fprintln(stderr, "A stack DIR is served whole and takes online snapshot, snapshot-delete and grow requests")
		fmt.Fprintln(stderr, "on DIR/"+controlName+" (the grow also resizes the device).")
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
	index := nbd.AnyDevice
	if *device != "" {
		i, err := nbd.ParseDevice(*device)
		if err != nil {
			fmt.Fprintf(stderr, "ploopctl attach: %v\n", err)
			return exitUsage
		}
		index = i
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

	img, kind, err := openImage(path, *readOnly, *direct)
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
	defer func() { report(closeImage(img)) }()

	srv, err := nbd.NewServer(nbd.Export{Name: filepath.Base(path), Description: kind + " image " + path, Backend: img, ReadOnly: *readOnly})
	if err != nil {
		report(err)
		return status
	}
	k, err := nbd.OpenKernel()
	if err != nil {
		report(err)
		return status
	}
	defer k.Close()
	att, err := k.Connect(ctx, srv, nbd.AttachOptions{BackendID: *id, Connections: *conns, Index: index})
	if err != nil {
		report(err)
		return status
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		report(att.Disconnect(dctx))
	}()
	if st, ok := img.(*ploop.Stack); ok && !*readOnly {
		// An online grow must reach the kernel device too.
		ctl, err := startControl(st, att.Resize)
		if err != nil {
			report(err)
			return status
		}
		defer func() { report(ctl.Close()) }()
	}
	if err := writePidFile(att.Index()); err != nil {
		report(err)
		return status
	}
	defer os.Remove(pidFile(att.Index()))
	if *mountDir != "" {
		opts := "rw"
		if *readOnly {
			opts = "ro"
		}
		if out, err := exec.Command("mount", "-o", opts, att.Path(), *mountDir).CombinedOutput(); err != nil {
			report(fmt.Errorf("mount %s on %s: %v: %s", att.Path(), *mountDir, err, strings.TrimSpace(string(out))))
			return status
		}
		defer func() {
			if err := unix.Unmount(*mountDir, 0); err != nil {
				report(fmt.Errorf("unmount %s: %w", *mountDir, err))
			}
		}()
	}
	fmt.Fprintln(stdout, att.Path())
	select {
	case <-ctx.Done():
	case <-att.Gone():
		report(fmt.Errorf("%s was disconnected by someone else", att.Path()))
	}
	return status
}

func writePidFile(index int) error {
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(pidFile(index), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600)
}
