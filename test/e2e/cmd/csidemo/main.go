// Command csidemo is `make demo` (see test/demo.sh): it runs ploop-csi in
// mode all over a scratch storage root and walks a volume's life through
// the CSI gRPC API, printing each step (package test/e2e/demo). It needs
// root and a kernel with nbd, loop and ext4 project quota.
//
//	csidemo [--driver bin/ploop-csi] [--tmpdir DIR] [--timeout 15m]
//
// Exit status: 0 when every step did what it showed, 1 when one failed
// (the output says which and why), 2 for a usage error.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/demo"
)

func main() {
	fs := flag.NewFlagSet("csidemo", flag.ContinueOnError)
	driver := fs.String("driver", defaultDriver(), "the ploop-csi binary")
	tmp := fs.String("tmpdir", "", "where the demo makes its work directory (default $TMPDIR or /tmp)")
	timeout := fs.Duration("timeout", 15*time.Minute, "limit for the whole demo")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if err == flag.ErrHelp {
			os.Exit(0)
		}
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "csidemo: unexpected arguments %q\n", fs.Args())
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	err := demo.Run(ctx, demo.Config{Driver: *driver, TempDir: *tmp, Out: os.Stdout})
	cancel()
	stop()
	if err != nil {
		// The output already ends with the failure; stderr gets it too
		// for a caller that keeps only that.
		fmt.Fprintf(os.Stderr, "csidemo: %v\n", err)
		os.Exit(1)
	}
}

// defaultDriver is ploop-csi next to this binary (make build puts both in
// bin/).
func defaultDriver() string {
	if self, err := os.Executable(); err == nil {
		return filepath.Join(filepath.Dir(self), "ploop-csi")
	}
	return "ploop-csi"
}
