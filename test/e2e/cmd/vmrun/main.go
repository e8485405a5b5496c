// Command vmrun runs one command as root inside the vmtest VM (Debian's
// kernel with nbd, loop and project quota; the host root read-only; writable
// tmpfs /tmp and /run) and exits with the command's exit status.
//
//	go run ./test/e2e/cmd/vmrun [-mem MiB] [-cpus N] [-accel kvm|tcg] [-timeout D] -- CMD [ARG...]
//
// `make vm CMD='…'` wraps it. Harness failures (qemu missing, kernel download
// failing, boot failure, timeout) exit with status 125.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

const exitHarness = 125

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vmrun", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var opts vmtest.Options
	fs.IntVar(&opts.MemoryMiB, "mem", 0, "guest memory in MiB (default $PLOOP_CSI_VM_MEM or 2048)")
	fs.IntVar(&opts.CPUs, "cpus", 0, "guest CPUs (default $PLOOP_CSI_VM_CPUS or 2)")
	fs.StringVar(&opts.Accel, "accel", "", "kvm or tcg (default $PLOOP_CSI_VM_ACCEL, else kvm when usable)")
	fs.DurationVar(&opts.Timeout, "timeout", 10*time.Minute, "limit for the whole VM run")
	fs.StringVar(&opts.Kernel, "kernel", "", "Debian kernel package or meta-package to boot, e.g. "+vmtest.Kernel612+" for ublk (default $PLOOP_CSI_VM_KERNEL_PKG, else the stock kernel)")
	dir := fs.String("C", "", "working directory in the guest (default: the current directory)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: vmrun [flags] -- CMD [ARG...]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	if *dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			fmt.Fprintf(stderr, "vmrun: %v\n", err)
			return exitHarness
		}
		*dir = wd
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := vmtest.Exec(ctx, opts, vmtest.Command{
		Args:   fs.Args(),
		Dir:    *dir,
		Output: stdout,
		Logf: func(format string, a ...any) {
			fmt.Fprintf(stderr, format+"\n", a...)
		},
	})
	if err != nil {
		fmt.Fprintf(stderr, "vmrun: %v\n", err)
		return exitHarness
	}
	return res.ExitStatus
}
