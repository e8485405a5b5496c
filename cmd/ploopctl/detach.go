package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"golang.org/x/sys/unix"
)

func runDetach(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("detach", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", time.Minute, "how long to wait for the device to be released")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: ploopctl detach [--timeout D] /dev/nbdN")
		fmt.Fprintln(stderr, "Asks the `ploopctl attach` serving the device to unmount, disconnect and exit, and waits for it.")
		fmt.Fprintln(stderr, "A device without a running attach (its server died) is disconnected directly.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return exitUsage
	}
	index, err := nbd.ParseDevice(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(stderr, "ploopctl detach: %v\n", err)
		return exitUsage
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	pid, err := attachPid(index)
	switch {
	case err == nil:
		if err := stopAndWait(ctx, pid); err != nil {
			fmt.Fprintf(stderr, "ploopctl detach: %v\n", err)
			return exitFail
		}
		return exitOK
	case !errors.Is(err, os.ErrNotExist):
		fmt.Fprintf(stderr, "ploopctl detach: %v\n", err)
		return exitFail
	}
	k, err := nbd.OpenKernel()
	if err != nil {
		fmt.Fprintf(stderr, "ploopctl detach: %v\n", err)
		return exitFail
	}
	defer k.Close()
	if err := k.Disconnect(ctx, index); err != nil {
		fmt.Fprintf(stderr, "ploopctl detach: %v\n", err)
		return exitFail
	}
	return exitOK
}

// attachPid returns the pid of the live `ploopctl attach` serving device
// index; os.ErrNotExist when there is none (stale pid files included).
func attachPid(index int) (int, error) {
	b, err := os.ReadFile(pidFile(index))
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("bad pid file %s: %w", pidFile(index), os.ErrNotExist)
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return 0, fmt.Errorf("attach process %d is gone: %w", pid, os.ErrNotExist)
	}
	// Guard against a recycled pid: it must still be an attach.
	if !strings.Contains(string(cmdline), "attach\x00") {
		return 0, fmt.Errorf("pid %d is no longer ploopctl attach: %w", pid, os.ErrNotExist)
	}
	return pid, nil
}

// stopAndWait sends SIGTERM and waits on a pidfd for the process to exit.
func stopAndWait(ctx context.Context, pid int) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(fd)
	if err := unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0); err != nil {
		return fmt.Errorf("signal attach process %d: %w", pid, err)
	}
	for {
		ms := 1000
		if dl, ok := ctx.Deadline(); ok {
			ms = int(min(time.Until(dl), time.Second) / time.Millisecond)
		}
		if ms <= 0 {
			return fmt.Errorf("attach process %d did not exit: %w", pid, context.DeadlineExceeded)
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, ms)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("wait for attach process %d: %w", pid, err)
		}
		if n > 0 {
			return nil
		}
	}
}
