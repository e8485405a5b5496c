package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/ublk"
)

// fioJob is one of the measured jobs.
type fioJob struct {
	label string
	rw    string // fio's --rw
	bs    string
	depth int
	iops  bool // reported as IOPS, else MiB/s
}

var fioJobs = []fioJob{
	{"4 KiB random read, QD16 (IOPS)", "randread", "4k", 16, true},
	{"4 KiB random write, QD16 (IOPS)", "randwrite", "4k", 16, true},
	{"1 MiB sequential read, QD4 (MiB/s)", "read", "1M", 4, false},
	{"1 MiB sequential write, QD4 (MiB/s)", "write", "1M", 4, false},
}

// fioResult is what one fio run did, reads and writes together.
type fioResult struct {
	IOPS float64
	MiBs float64
	IOs  int64 // requests completed in the measured time
	// ServerCPU is the CPU time the device's server process spent during
	// the run, when the device has one.
	ServerCPU time.Duration
}

// cpuPerIO is the server's CPU time per request, in microseconds; NaN
// when unknown.
func (r fioResult) cpuPerIO() float64 {
	if r.ServerCPU <= 0 || r.IOs <= 0 {
		return math.NaN()
	}
	return float64(r.ServerCPU.Microseconds()) / float64(r.IOs)
}

// parseFio reads fio's --output-format=json for a single job. fio may
// print warnings before the JSON; they are skipped.
func parseFio(out []byte) (fioResult, error) {
	i := bytes.IndexByte(out, '{')
	if i < 0 {
		return fioResult{}, errors.New("fio printed no JSON")
	}
	var rep struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOPS    float64 `json:"iops"`
				BWBytes float64 `json:"bw_bytes"`
				IOs     int64   `json:"total_ios"`
			} `json:"read"`
			Write struct {
				IOPS    float64 `json:"iops"`
				BWBytes float64 `json:"bw_bytes"`
				IOs     int64   `json:"total_ios"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if err := json.NewDecoder(bytes.NewReader(out[i:])).Decode(&rep); err != nil {
		return fioResult{}, fmt.Errorf("fio's JSON: %w", err)
	}
	if len(rep.Jobs) != 1 {
		return fioResult{}, fmt.Errorf("fio reported %d jobs, want 1", len(rep.Jobs))
	}
	j := rep.Jobs[0]
	if j.Error != 0 {
		return fioResult{}, fmt.Errorf("fio's job failed: error %d", j.Error)
	}
	r := fioResult{IOPS: j.Read.IOPS + j.Write.IOPS, MiBs: (j.Read.BWBytes + j.Write.BWBytes) / (1 << 20), IOs: j.Read.IOs + j.Write.IOs}
	if r.IOPS <= 0 {
		return fioResult{}, errors.New("fio did no I/O")
	}
	return r, nil
}

// runFio runs fio with direct I/O through libaio on dev. runtime 0 runs
// the job once over the whole device instead of for a time. server, when
// not 0, is the process serving dev, whose CPU time is measured (only
// without a warm-up, which fio does not count).
func runFio(ctx context.Context, dev, rw, bs string, depth int, runtime, ramp time.Duration, server int) (fioResult, error) {
	var cpu0 time.Duration
	if server != 0 && ramp == 0 {
		var err error
		if cpu0, err = processCPU(server); err != nil {
			return fioResult{}, err
		}
	}
	args := []string{"--name=bench", "--filename=" + dev, "--direct=1", "--ioengine=libaio", "--rw=" + rw, "--bs=" + bs,
		"--iodepth=" + strconv.Itoa(depth), "--numjobs=1", "--output-format=json"}
	if runtime > 0 {
		args = append(args, "--time_based", fmt.Sprintf("--runtime=%dms", runtime.Milliseconds()),
			fmt.Sprintf("--ramp_time=%dms", ramp.Milliseconds()))
	}
	out, err := sh(ctx, "fio", args...)
	if err != nil {
		return fioResult{}, err
	}
	r, err := parseFio([]byte(out))
	if err != nil {
		return r, fmt.Errorf("fio %s on %s: %w", rw, dev, err)
	}
	if server != 0 && ramp == 0 {
		cpu1, err := processCPU(server)
		if err != nil {
			return r, err
		}
		r.ServerCPU = cpu1 - cpu0
	}
	return r, nil
}

// clockTick is the unit of /proc/PID/stat's times (USER_HZ, 100 on every
// Linux architecture the driver runs on).
const clockTick = 10 * time.Millisecond

// parseStat returns the user plus system time of /proc/PID/stat.
func parseStat(data []byte) (time.Duration, error) {
	// The command name, in parentheses, may hold blanks and parentheses:
	// the fields that follow start after the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("/proc/PID/stat: no command name")
	}
	f := strings.Fields(string(data[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/PID/stat: %d fields after the name, want at least 13", len(f))
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("/proc/PID/stat: bad time %q", s)
		}
		if n > math.MaxInt64/int64(clockTick)/2 {
			return 0, fmt.Errorf("/proc/PID/stat: time %d ticks out of range", n)
		}
		ticks += n
	}
	return time.Duration(ticks) * clockTick, nil
}

func processCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStat(data)
}

// fioDevice is one of the devices compared.
type fioDevice struct {
	name   string
	path   string
	what   string // how it was made, for the table's notes
	server int    // the serving process, 0 for the in-kernel loop device
}

// benchFio measures the jobs on the three devices, interleaved: each job
// runs on every device before the next job starts, in an order that
// rotates with each round.
func (b *bench) benchFio(ctx context.Context) (string, error) {
	size := b.cfg.fioMiB << 20
	mark := len(b.cleanup)
	vol, err := b.createVolume(ctx, "bench-fio", size, "nbd")
	if err != nil {
		return "", err
	}
	if err := b.stage(ctx, vol, true); err != nil {
		return "", err
	}
	qemu, err := b.qemuNBD(ctx, size)
	if err != nil {
		return "", err
	}
	loop, err := b.loopDevice(ctx, size)
	if err != nil {
		return "", err
	}
	devs := []fioDevice{
		{"ploop", vol.target, fmt.Sprintf("ploop-csi Block volume, %s (published at the pod's path)", vol.dev), b.driver.Pid()},
		qemu, loop,
	}
	// The ratios each table row shows: the driver against the goals'
	// references, and where the kernel has ublk, the same image format
	// served through it.
	ratios := [][2]string{{"ploop", "qemu-nbd"}, {"ploop", "loop"}}
	if _, err := os.Stat(ublk.ControlPath); err == nil {
		// The driver's own ublk path (a volume whose class asks for
		// it), and its upper bound: the same image served inline by
		// this process.
		uv, err := b.createVolume(ctx, "bench-fio-ublk", size, "ublk")
		if err != nil {
			return "", err
		}
		if err := b.stage(ctx, uv, true); err != nil {
			return "", err
		}
		devs = append(devs, fioDevice{"ploop-ublk", uv.target, fmt.Sprintf("ploop-csi Block volume attached through ublk (StorageClass attach: ublk), %s", uv.dev), b.driver.Pid()})
		u, err := b.ublkDevice(size, true)
		if err != nil {
			return "", err
		}
		devs = append(devs, u)
		ratios = append(ratios, [2]string{"ploop-ublk", "loop"}, [2]string{"ploop-ublk", "ploop"}, [2]string{"ublk-inl", "loop"})
	}
	var jobs []fioJob
	for _, j := range fioJobs {
		if b.cfg.fioJobs[j.rw] {
			jobs = append(jobs, j)
		}
	}
	res := map[string]map[string][]fioResult{} // job → device → rounds
	prefill := map[string]fioResult{}
	// Every device is thin until written: a read of a hole costs ploop
	// and qemu-nbd nothing, so each is written through once first, which
	// also measures the allocating write.
	for _, d := range devs {
		b.logf("fio: writing %s through once (%d MiB)", d.name, b.cfg.fioMiB)
		r, err := runFio(ctx, d.path, "write", "1M", 4, 0, 0, d.server)
		if err != nil {
			return "", err
		}
		prefill[d.name] = r
	}
	for round := 0; round < b.cfg.fioRounds; round++ {
		for _, j := range jobs {
			for i := range devs {
				d := devs[(i+round)%len(devs)]
				r, err := runFio(ctx, d.path, j.rw, j.bs, j.depth, b.cfg.fioTime, b.cfg.fioRamp, d.server)
				if err != nil {
					return "", err
				}
				b.logf("fio: round %d %-36s %-8s %8.0f IOPS %8.1f MiB/s", round+1, j.label, d.name, r.IOPS, r.MiBs)
				if res[j.label] == nil {
					res[j.label] = map[string][]fioResult{}
				}
				res[j.label][d.name] = append(res[j.label][d.name], r)
			}
		}
	}

	// Take everything down before the next measurement, and give the
	// space back to the tmpfs under the scratch file system.
	if err := b.unwind(ctx, mark); err != nil {
		return "", err
	}
	if err := b.deleteVolume(ctx, vol); err != nil {
		return "", err
	}
	for _, f := range []string{"raw.img", "image.hds"} {
		if err := os.Remove(filepath.Join(b.cmp, f)); err != nil {
			return "", err
		}
	}
	if err := b.trimRoot(ctx); err != nil {
		return "", err
	}

	t := table{
		title: fmt.Sprintf("fio, direct I/O (libaio), %d MiB devices, %v per job and device%s, %d round(s), median",
			b.cfg.fioMiB, b.cfg.fioTime, warmUp(b.cfg.fioRamp), b.cfg.fioRounds),
		header: []string{"job"},
	}
	for _, d := range devs {
		t.header = append(t.header, d.name)
	}
	for _, r := range ratios {
		t.header = append(t.header, r[0]+"/"+r[1])
	}
	iops := func(r fioResult) float64 { return r.IOPS }
	mibs := func(r fioResult) float64 { return r.MiBs }
	row := func(label string, value func(fioResult) float64, vals map[string][]fioResult, prec int) []string {
		cells := []string{label}
		for _, d := range devs {
			cells = append(cells, num(medianOf(vals[d.name], value), prec))
		}
		for _, r := range ratios {
			a, b := vals[r[0]], vals[r[1]]
			cells = append(cells, ratio(medianOf(a, value), medianOf(b, value))+roundRange(a, b, value))
		}
		return cells
	}
	var missQemu, missLoop, missUblkNBD, missUblkLoop []string
	haveUblk := slices.ContainsFunc(devs, func(d fioDevice) bool { return d.name == "ploop-ublk" })
	for _, j := range jobs {
		f, prec := mibs, 1
		if j.iops {
			f, prec = iops, 0
		}
		t.rows = append(t.rows, row(j.label, f, res[j.label], prec))
		p, q, l := medianOf(res[j.label]["ploop"], f), medianOf(res[j.label]["qemu-nbd"], f), medianOf(res[j.label]["loop"], f)
		if !(p >= q) {
			missQemu = append(missQemu, j.label)
		}
		if !(p >= 0.8*l) {
			missLoop = append(missLoop, j.label)
		}
		if u := medianOf(res[j.label]["ploop-ublk"], f); haveUblk {
			if !(u >= 3*p) {
				missUblkNBD = append(missUblkNBD, j.label)
			}
			if !(u >= 0.6*l) {
				missUblkLoop = append(missUblkLoop, j.label)
			}
		}
	}
	pf := map[string][]fioResult{}
	for k, v := range prefill {
		pf[k] = []fioResult{v}
	}
	t.rows = append(t.rows, row("first write through, 1 MiB QD4 (MiB/s)", mibs, pf, 1))
	if b.cfg.fioRamp == 0 {
		cpu := func(r fioResult) float64 { return r.cpuPerIO() }
		for _, j := range jobs {
			vals := res[j.label]
			cells := []string{"server CPU µs per request, " + j.rw}
			for _, d := range devs {
				c := ""
				if d.server != 0 {
					c = num(medianOf(vals[d.name], cpu), 0)
				}
				cells = append(cells, c)
			}
			cells = append(cells, ratio(medianOf(vals["ploop"], cpu), medianOf(vals["qemu-nbd"], cpu)))
			for range ratios[1:] {
				cells = append(cells, "")
			}
			t.rows = append(t.rows, cells)
		}
	}
	t.notes = []string{
		goal("ploop ≥ 1.00x qemu-nbd", len(jobs), missQemu),
		goal("ploop ≥ 0.80x loop", len(jobs), missLoop),
	}
	if haveUblk {
		t.notes = append(t.notes,
			goal("ploop-ublk ≥ 3.00x ploop", len(jobs), missUblkNBD),
			goal("ploop-ublk ≥ 0.60x loop", len(jobs), missUblkLoop))
	}
	if b.cfg.fioRamp == 0 {
		t.notes = append(t.notes, "server CPU: user+system time of the serving process (ploop-csi, qemu-nbd, benchdriver for ublk) per request; lower is better, and less noisy than throughput on a busy host")
	}
	if b.cfg.fioRounds > 1 {
		t.notes = append(t.notes, "ratios: of the medians, with the range of the per-round ratios (each round runs a job on every device back to back)")
	}
	if len(b.cfg.driverFlags) > 0 {
		t.notes = append(t.notes, "ploop-csi ran with "+strings.Join(b.cfg.driverFlags, " "))
	}
	for _, d := range devs {
		t.notes = append(t.notes, fmt.Sprintf("%-8s %s", d.name, d.what))
	}
	t.notes = append(t.notes, "all thin, on the same ext4 (a sparse file in the guest's tmpfs, on a loop device); "+
		"the last row is their first, allocating write, not a goal")
	return t.String(), nil
}

func warmUp(d time.Duration) string {
	if d == 0 {
		return ""
	}
	return fmt.Sprintf(" after %v warm-up", d)
}

// roundRange is " (min–max)" of the per-round ratios a/b, or "" for one
// round.
func roundRange(a, b []fioResult, f func(fioResult) float64) string {
	if len(a) < 2 || len(a) != len(b) {
		return ""
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for i := range a {
		if f(b[i]) <= 0 {
			return ""
		}
		r := f(a[i]) / f(b[i])
		lo, hi = math.Min(lo, r), math.Max(hi, r)
	}
	return fmt.Sprintf(" (%.2f–%.2f)", lo, hi)
}

// goal says whether a goal held in every job, and where it did not.
func goal(what string, jobs int, missed []string) string {
	if len(missed) == 0 {
		return fmt.Sprintf("goal %s: met in all %d jobs", what, jobs)
	}
	return fmt.Sprintf("goal %s: NOT met in %d of %d jobs (%s)", what, len(missed), jobs, strings.Join(missed, "; "))
}

// qemuNBD serves a fresh parallels image (ploop's format) of size with
// qemu-nbd --connect, with O_DIRECT (--cache=none) as ploop-csi and the
// loop device use it, and Linux AIO.
func (b *bench) qemuNBD(ctx context.Context, size int64) (fioDevice, error) {
	img := filepath.Join(b.cmp, "image.hds")
	if _, err := sh(ctx, "qemu-img", "create", "-q", "-f", "parallels", img, strconv.FormatInt(size, 10)); err != nil {
		return fioDevice{}, err
	}
	dev, err := freeNBD()
	if err != nil {
		return fioDevice{}, err
	}
	pidFile := filepath.Join(b.work, "qemu-nbd.pid")
	// --connect puts qemu-nbd in the background once the device is set up.
	if _, err := sh(ctx, "qemu-nbd", "--format=parallels", "--cache=none", "--aio=native", "--pid-file="+pidFile,
		"--connect="+dev, img); err != nil {
		return fioDevice{}, err
	}
	b.cleanup = append(b.cleanup, func(ctx context.Context) error {
		_, err := sh(ctx, "qemu-nbd", "--disconnect", dev)
		if err != nil {
			return err
		}
		return waitPidFileGone(ctx, pidFile)
	})
	if err := waitFor(ctx, 30*time.Second, func() bool { return deviceSize(dev) == size }); err != nil {
		return fioDevice{}, fmt.Errorf("qemu-nbd on %s: the device did not take the image's size: %w", dev, err)
	}
	pid, err := readPidFile(pidFile)
	if err != nil {
		return fioDevice{}, err
	}
	return fioDevice{"qemu-nbd", dev, fmt.Sprintf("qemu-nbd --connect=%s -f parallels --cache=none --aio=native (qemu's parallels format; one connection)", dev), pid}, nil
}

// loopDevice attaches a sparse raw file of size to a loop device with
// direct I/O.
func (b *bench) loopDevice(ctx context.Context, size int64) (fioDevice, error) {
	raw := filepath.Join(b.cmp, "raw.img")
	f, err := os.Create(raw)
	if err != nil {
		return fioDevice{}, err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fioDevice{}, err
	}
	out, err := sh(ctx, "losetup", "--find", "--show", "--direct-io=on", raw)
	if err != nil {
		return fioDevice{}, err
	}
	dev := strings.TrimSpace(out)
	b.cleanup = append(b.cleanup, func(ctx context.Context) error {
		_, err := sh(ctx, "losetup", "--detach", dev)
		return err
	})
	// losetup falls back to buffered I/O, with only a warning, where the
	// backing file system refuses O_DIRECT.
	dio, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "dio"))
	if err != nil || strings.TrimSpace(string(dio)) != "1" {
		return fioDevice{}, fmt.Errorf("%s: direct I/O is off (loop/dio %q, %v)", dev, dio, err)
	}
	return fioDevice{"loop", dev, fmt.Sprintf("losetup --direct-io=on %s over a sparse raw file", dev), 0}, nil
}

// freeNBD returns an nbd device that is not connected.
func freeNBD() (string, error) {
	devs, err := filepath.Glob("/sys/block/nbd*")
	if err != nil {
		return "", err
	}
	for _, d := range devs {
		if _, err := os.Stat(filepath.Join(d, "pid")); os.IsNotExist(err) && deviceSize("/dev/"+filepath.Base(d)) == 0 {
			return "/dev/" + filepath.Base(d), nil
		}
	}
	return "", errors.New("no free nbd device")
}

// deviceSize is a block device's size in bytes from sysfs, 0 if unknown.
func deviceSize(dev string) int64 {
	data, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	return n * 512
}

// waitFor polls cond until it holds or the timeout ends: for state that
// another process changes and nothing announces.
func waitFor(ctx context.Context, timeout time.Duration, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
	return nil
}

func readPidFile(pidFile string) (int, error) {
	data, err := os.ReadFile(pidFile)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("%s: bad pid %q", pidFile, data)
	}
	return pid, nil
}

// waitPidFileGone waits until the process named in pidFile has exited.
func waitPidFileGone(ctx context.Context, pidFile string) error {
	if _, err := os.Stat(pidFile); os.IsNotExist(err) {
		return nil // qemu-nbd removes it when it exits
	}
	pid, err := readPidFile(pidFile)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, time.Minute, func() bool { return syscall.Kill(pid, 0) != nil }); err != nil {
		return fmt.Errorf("qemu-nbd (pid %d) did not exit after --disconnect: %w", pid, err)
	}
	return nil
}

// ublkDevice serves a new thin ploop image of size through ublk from
// this process (pkg/ublk, as the driver's attach path would), with a
// goroutine per request or inline on the queues' threads.
func (b *bench) ublkDevice(size int64, inline bool) (fioDevice, error) {
	name, how := "ublk", "a goroutine per request"
	if inline {
		name, how = "ublk-inl", "requests served inline on the queues' threads"
	}
	path := filepath.Join(b.cmp, name+".hds")
	img, err := ploop.Create(path, ploop.CreateOptions{Size: size})
	if err != nil {
		return fioDevice{}, err
	}
	ctrl, err := ublk.OpenControl()
	if err != nil {
		img.Close()
		return fioDevice{}, err
	}
	d, err := ublk.Create(ctrl, img, ublk.Options{Inline: inline})
	if err != nil {
		ctrl.Close()
		img.Close()
		return fioDevice{}, err
	}
	b.cleanup = append(b.cleanup, func(context.Context) error {
		return errors.Join(d.Close(), ctrl.Close(), img.Close(), os.Remove(path))
	})
	info := d.Info()
	return fioDevice{name, d.Path(), fmt.Sprintf("a ploop image served through ublk by benchdriver itself (pkg/ublk: %d queues of depth %d, %s)", info.Queues, info.Depth, how), os.Getpid()}, nil
}
