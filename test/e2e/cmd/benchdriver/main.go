// Command benchdriver is the driver-side workload of test/bench/bench-driver.sh:
// it runs the real ploop-csi in mode all over a scratch storage root, drives
// it through its CSI gRPC API, and prints three tables measured in one run:
//
//  1. fio (direct I/O, libaio) on the raw nbd device of a staged Block-mode
//     ploop volume against the same job on a loop device with direct I/O over
//     a raw file, and on qemu-nbd --connect of a parallels image (the same
//     format), all three thin, of the same size, on the same file system and
//     written through once before the jobs run;
//  2. CreateSnapshot latency of an attached (online) volume with 100 MiB and
//     with 2 GiB written since the previous snapshot;
//  3. the driver process's RSS with 0, 1 and 16 sparse 1 TiB volumes staged.
//
// It needs root, a kernel with nbd and loop, fio, qemu-img and qemu-nbd; the
// bench script runs it in the test VM (test/e2e/vmtest). The storage root
// is an ext4 file system in a sparse file under --tmpdir (the VM's tmpfs),
// so the fio numbers compare the three I/O paths, not a disk.
//
//	benchdriver [--driver bin/ploop-csi] [--sections fio,snapshot,rss] [flags]
//
// Exit status: 0 when every measurement ran (whether or not a goal is met:
// the tables say), 1 when one failed, 2 for a usage error.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		if err == flag.ErrHelp {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "benchdriver: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	err = run(ctx, cfg, os.Stdout)
	cancel()
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "benchdriver: %v\n", err)
		os.Exit(1)
	}
}

// config is the command line.
type config struct {
	driver      string
	driverFlags []string // added to ploop-csi's command line
	driverLog   string   // where ploop-csi's log goes; "" is the work directory (removed)
	tmpDir      string
	sections    map[string]bool
	timeout     time.Duration

	fioMiB    int64           // size of each device fio runs on
	fioTime   time.Duration   // measured time per job and device
	fioRamp   time.Duration   // unmeasured warm-up per job and device
	fioRounds int             // rounds of every job on every device; the median is kept
	fioJobs   map[string]bool // by fio's --rw

	snapMiB     []int64 // data written before each snapshot, per volume
	snapSamples int

	rssVolumes int
	rssGiB     int64
}

var allSections = []string{"fio", "snapshot", "rss"}

func parseFlags(args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("benchdriver", flag.ContinueOnError)
	fs.StringVar(&c.driver, "driver", defaultDriver(), "the ploop-csi binary")
	fs.Func("driver-flag", "a flag for ploop-csi, e.g. --driver-flag=--nbd-connections=1 (repeatable)", func(s string) error {
		if !strings.HasPrefix(s, "-") {
			return fmt.Errorf("%q is not a flag", s)
		}
		c.driverFlags = append(c.driverFlags, s)
		return nil
	})
	fs.StringVar(&c.driverLog, "driver-log", "", "write ploop-csi's log (--v 2) to this file and keep it")
	fs.StringVar(&c.tmpDir, "tmpdir", "", "where the work directory goes (default $TMPDIR or /tmp)")
	sections := fs.String("sections", strings.Join(allSections, ","), "which measurements to run")
	fs.DurationVar(&c.timeout, "timeout", 55*time.Minute, "limit for the whole run")
	fs.Int64Var(&c.fioMiB, "fio-size", 512, "MiB: size of each device fio runs on")
	fs.DurationVar(&c.fioTime, "fio-runtime", 5*time.Second, "measured time of each fio job on each device")
	fs.DurationVar(&c.fioRamp, "fio-ramp", 0, "unmeasured warm-up before each fio job (the server's CPU per request is measured only without)")
	jobs := fs.String("fio-jobs", "randread,randwrite,read,write", "which fio jobs to run (by fio's --rw)")
	fs.IntVar(&c.fioRounds, "fio-rounds", 3, "rounds of every job on every device (devices interleaved; median kept)")
	snap := fs.String("snap-sizes", "100,2048", "MiB written before each snapshot, one volume per size")
	fs.IntVar(&c.snapSamples, "snap-samples", 3, "snapshots of each volume")
	fs.IntVar(&c.rssVolumes, "rss-volumes", 16, "how many volumes the RSS measurement stages")
	fs.Int64Var(&c.rssGiB, "rss-size", 1024, "GiB: size of each (sparse) volume of the RSS measurement")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	c.sections = map[string]bool{}
	for _, s := range strings.Split(*sections, ",") {
		if !contains(allSections, s) {
			return c, fmt.Errorf("--sections: unknown %q (want some of %s)", s, strings.Join(allSections, ","))
		}
		c.sections[s] = true
	}
	c.fioJobs = map[string]bool{}
	for _, s := range strings.Split(*jobs, ",") {
		known := false
		for _, j := range fioJobs {
			known = known || j.rw == s
		}
		if !known {
			return c, fmt.Errorf("--fio-jobs: unknown %q", s)
		}
		c.fioJobs[s] = true
	}
	for _, s := range strings.Split(*snap, ",") {
		var n int64
		if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n < 1 || fmt.Sprint(n) != s {
			return c, fmt.Errorf("--snap-sizes: %q is not a whole number of MiB", s)
		}
		c.snapMiB = append(c.snapMiB, n)
	}
	switch {
	case c.fioMiB < 16 || c.fioTime < time.Second || c.fioRamp < 0 || c.fioRounds < 1:
		return c, fmt.Errorf("fio: want --fio-size ≥ 16, --fio-runtime ≥ 1s, --fio-ramp ≥ 0, --fio-rounds ≥ 1")
	case c.snapSamples < 1 || c.rssVolumes < 1 || c.rssGiB < 1:
		return c, fmt.Errorf("want --snap-samples, --rss-volumes and --rss-size ≥ 1")
	}
	return c, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// defaultDriver is ploop-csi next to this binary.
func defaultDriver() string {
	if self, err := os.Executable(); err == nil {
		return filepath.Join(filepath.Dir(self), "ploop-csi")
	}
	return "ploop-csi"
}
