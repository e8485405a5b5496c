package powerloss

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/test/e2e/logwrites"
	"golang.org/x/sys/unix"
)

// loopDev is a loop device attached to a file by this process. The device
// clears itself (LO_FLAGS_AUTOCLEAR) once the last user, its mount or our
// descriptor, lets go of it.
type loopDev struct {
	path string
	f    *os.File
}

// attachLoop attaches file to a free loop device with ioctls: losetup is a
// process start, which costs most of a second in an emulated guest.
func attachLoop(file string) (*loopDev, error) {
	backing, err := os.OpenFile(file, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attach loop: %w", err)
	}
	defer backing.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attach loop: %w", err)
	}
	defer ctl.Close()
	// Another process may take the free device between the two ioctls.
	for range 10 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("attach loop %s: LOOP_CTL_GET_FREE: %w", file, err)
		}
		path := "/dev/loop" + strconv.Itoa(n)
		dev, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("attach loop %s: %w", file, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		copy(cfg.Info.File_name[:], file)
		err = unix.IoctlLoopConfigure(int(dev.Fd()), &cfg)
		if errors.Is(err, unix.EBUSY) {
			dev.Close()
			continue
		}
		if err != nil {
			dev.Close()
			return nil, fmt.Errorf("attach loop %s to %s: LOOP_CONFIGURE: %w", file, path, err)
		}
		return &loopDev{path: path, f: dev}, nil
	}
	return nil, fmt.Errorf("attach loop %s: every free loop device was taken meanwhile", file)
}

// release drops our hold; the device detaches once it is not mounted.
func (l *loopDev) release() { l.f.Close() }

func mountExt4(dev, dir string) error {
	if err := unix.Mount(dev, dir, "ext4", 0, ""); err != nil {
		return fmt.Errorf("mount %s on %s: %w", dev, dir, err)
	}
	return nil
}

func unmount(dir string) error {
	if err := unix.Unmount(dir, 0); err != nil {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	return nil
}

// run runs a command in the guest and returns its combined output.
func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, tail(string(out), 20))
	}
	return string(out), nil
}

// tail keeps the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[%d lines before]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// copySparse copies src to a new dst, only the data parts of src (the
// copies are of a mostly empty file system image on tmpfs).
func copySparse(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_TRUNC|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(st.Size()); err != nil {
		return err
	}
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("copy %s: SEEK_DATA: %w", src, err)
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("copy %s: SEEK_HOLE: %w", src, err)
		}
		// Copied inside the kernel: under emulation every copy through
		// user space counts.
		for pos := data; pos < hole; {
			roff, woff := pos, pos
			n, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(hole-pos), 0)
			if err != nil {
				return fmt.Errorf("copy %s: copy_file_range: %w", src, err)
			}
			if n == 0 {
				return fmt.Errorf("copy %s: copy_file_range copied nothing at %d", src, pos)
			}
			pos += int64(n)
		}
		off = hole
	}
	return out.Close()
}

// rig is the logged storage of one scenario: an ext4 file system made on a
// loop file, then mounted through a dm-log-writes device that records
// every write to it in a second loop file. base keeps the file system as
// it was before logging started: the log replays onto a copy of it.
type rig struct {
	t                  *testing.T
	dir                string
	dataFile, logFile  string
	baseFile           string
	dataDev, logDev    *loopDev
	dmName, dmDev, mnt string
	fsBytes            int64
	mounted, dmCreated bool
	logF               *os.File // the finished log, open for replay

	// execMu is held shared while a child process starts and exclusively
	// to unmount: until its exec, a child holds a copy of every
	// descriptor of this process, and an unmount meanwhile (another check
	// running in parallel) would find the file system busy.
	execMu sync.RWMutex
	timing phaseTimes
}

// phaseTimes sums where the replay checks spend their time.
type phaseTimes struct {
	mu sync.Mutex
	d  map[string]time.Duration
}

func (p *phaseTimes) add(phase string, since time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.d == nil {
		p.d = map[string]time.Duration{}
	}
	p.d[phase] += time.Since(since)
}

func (p *phaseTimes) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var parts []string
	for k, v := range p.d {
		parts = append(parts, fmt.Sprintf("%s %v", k, v.Round(time.Second)))
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// command runs a command during the replay checks (see execMu).
func (r *rig) command(ctx context.Context, name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	r.execMu.RLock()
	err := cmd.Start()
	r.execMu.RUnlock()
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, tail(out.String(), 20))
	}
	return out.String(), nil
}

func (r *rig) unmount(dir string) error {
	r.execMu.Lock()
	defer r.execMu.Unlock()
	// The kernel sometimes reports a mount busy for a moment after the
	// last descriptor in it was closed (no process holds anything there
	// then); a few attempts, with a look for holders between, get past it.
	var err error
	var seen []string
	for range 5 {
		if err = unmount(dir); !errors.Is(err, unix.EBUSY) {
			return err
		}
		seen = append(seen, holders(dir)...)
	}
	return fmt.Errorf("%w (5 attempts; holders seen: %v)", err, seen)
}

// holders lists the processes' descriptors and directories under dir.
func holders(dir string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		links, _ := filepath.Glob(p + "/fd/*")
		links = append(links, p+"/cwd", p+"/root")
		for _, l := range links {
			if dst, err := os.Readlink(l); err == nil && strings.HasPrefix(dst, dir) {
				comm, _ := os.ReadFile(p + "/comm")
				out = append(out, fmt.Sprintf("%s (%s) -> %s", l, strings.TrimSpace(string(comm)), dst))
			}
		}
	}
	return out
}

// newRig makes the file system (fsMiB) and the log (logMiB, sparse) in a
// fresh directory of the guest's /tmp and mounts the file system.
func newRig(t *testing.T, name string, fsMiB, logMiB int64) *rig {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	r := &rig{
		t: t, dir: dir,
		dataFile: filepath.Join(dir, "data.img"), logFile: filepath.Join(dir, "log.img"),
		baseFile: filepath.Join(dir, "base.img"), dmName: "powerloss-" + name,
		mnt: filepath.Join(dir, "mnt"), fsBytes: fsMiB << 20,
	}
	t.Cleanup(r.cleanup)
	for _, f := range []struct {
		path string
		size int64
	}{{r.dataFile, fsMiB << 20}, {r.logFile, logMiB << 20}} {
		if err := os.WriteFile(f.path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(f.path, f.size); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if r.dataDev, err = attachLoop(r.dataFile); err != nil {
		t.Fatal(err)
	}
	if r.logDev, err = attachLoop(r.logFile); err != nil {
		t.Fatal(err)
	}
	// 4 KiB blocks as on a real host (mke2fs picks 1 KiB for small file
	// systems). The sparse file reads as zeros: saying so spares the
	// zeroing (which a tmpfs-backed loop device rejects) and leaves the
	// kernel no lazy inode table initialisation to log.
	if _, err := run(ctx, "mkfs.ext4", "-q", "-F", "-b", "4096",
		"-E", "assume_storage_prezeroed=1,nodiscard", r.dataDev.path); err != nil {
		t.Fatal(err)
	}
	if err := copySparse(r.baseFile, r.dataFile); err != nil {
		t.Fatal(err)
	}
	table := fmt.Sprintf("0 %d log-writes %s %s", r.fsBytes/512, r.dataDev.path, r.logDev.path)
	if _, err := run(ctx, "dmsetup", "create", r.dmName, "--noudevsync", "--table", table); err != nil {
		t.Fatal(err)
	}
	r.dmCreated = true
	if r.dmDev, err = dmDevice(r.dmName); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(r.mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mountExt4(r.dmDev, r.mnt); err != nil {
		t.Fatal(err)
	}
	r.mounted = true
	return r
}

// dmDevice finds the /dev/dm-N node of the device-mapper device name
// (without udev there is no /dev/mapper/NAME link to rely on).
func dmDevice(name string) (string, error) {
	ms, err := filepath.Glob("/sys/block/dm-*/dm/name")
	if err != nil {
		return "", err
	}
	for _, m := range ms {
		b, err := os.ReadFile(m)
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(m))), nil
		}
	}
	return "", fmt.Errorf("no /sys/block/dm-*/dm/name says %q", name)
}

// mark inserts a mark into the log.
func (r *rig) mark(name string) error { return logwrites.Mark(r.dmName, name) }

// finish unmounts the file system, removes the log-writes device (which
// writes its last entries and the final super block) and parses the log.
func (r *rig) finish() *logwrites.Log {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := unmount(r.mnt); err != nil {
		r.t.Fatal(err)
	}
	r.mounted = false
	if _, err := run(ctx, "dmsetup", "remove", "--noudevsync", r.dmName); err != nil {
		r.t.Fatal(err)
	}
	r.dmCreated = false
	r.dataDev.release()
	r.logDev.release()
	f, err := os.Open(r.logFile)
	if err != nil {
		r.t.Fatal(err)
	}
	r.logF = f
	st, err := f.Stat()
	if err != nil {
		r.t.Fatal(err)
	}
	lg, err := logwrites.Parse(f, st.Size())
	if err != nil {
		r.t.Fatalf("parse the dm-log-writes log: %v", err)
	}
	// The device's destructor logs this mark after everything else: if
	// logging had stopped (a full log device), it would be missing.
	if _, err := lg.Mark("dm-log-writes-end"); err != nil {
		r.t.Fatalf("the log is incomplete: %v", err)
	}
	return lg
}

func (r *rig) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if r.mounted {
		if err := unmount(r.mnt); err != nil {
			r.t.Errorf("cleanup: %v", err)
		}
	}
	if r.dmCreated {
		if _, err := run(ctx, "dmsetup", "remove", "--noudevsync", r.dmName); err != nil {
			r.t.Errorf("cleanup: %v", err)
		}
	}
	for _, l := range []*loopDev{r.dataDev, r.logDev} {
		if l != nil {
			l.release()
		}
	}
	if r.logF != nil {
		r.logF.Close()
	}
}

// qemuImgChecker runs `qemu-img check -f parallels` and remembers the
// images it found clean. Its verdict depends only on the header, the BAT
// and the file size (QEMU's parallels_co_check reads nothing else), and
// those change far less often than the data between two replay points; a
// process start is slow in the guest.
type qemuImgChecker struct {
	r     *rig
	seed  maphash.Seed
	mu    sync.Mutex
	clean map[uint64]bool
	runs  int
}

func newQemuImgChecker(r *rig) *qemuImgChecker {
	return &qemuImgChecker{r: r, seed: maphash.MakeSeed(), clean: map[uint64]bool{}}
}

// metaKey hashes what qemu-img check looks at; ok is false when the
// header does not parse (qemu-img must then say so itself).
func (q *qemuImgChecker) metaKey(path string) (key uint64, ok bool, _ error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, false, err
	}
	hb := make([]byte, ploop.HeaderSize)
	if _, err := f.ReadAt(hb, 0); err != nil {
		return 0, false, nil
	}
	h, err := ploop.ParseHeader(hb)
	if err != nil {
		return 0, false, nil
	}
	meta := make([]byte, min(st.Size(), ploop.HeaderSize+4*int64(h.BATEntries)))
	if _, err := f.ReadAt(meta, 0); err != nil && !errors.Is(err, io.EOF) {
		return 0, false, err
	}
	var mh maphash.Hash
	mh.SetSeed(q.seed)
	mh.Write(meta)
	fmt.Fprintf(&mh, "size %d", st.Size())
	return mh.Sum64(), true, nil
}

func (q *qemuImgChecker) check(ctx context.Context, path string) error {
	h, cacheable, err := q.metaKey(path)
	if err != nil {
		return err
	}
	q.mu.Lock()
	known := cacheable && q.clean[h]
	q.mu.Unlock()
	if known {
		return nil
	}
	t0 := time.Now()
	out, err := q.r.command(ctx, "qemu-img", "check", "-f", "parallels", path)
	q.r.timing.add("qemu-img", t0)
	q.mu.Lock()
	q.runs++
	q.mu.Unlock()
	if err != nil {
		return err
	}
	if !strings.Contains(out, "No errors were found") {
		return fmt.Errorf("qemu-img check -f parallels %s exited 0 but says: %s", filepath.Base(path), tail(out, 12))
	}
	if cacheable {
		q.mu.Lock()
		q.clean[h] = true
		q.mu.Unlock()
	}
	return nil
}

// fsckAndMount recovers the journal of the file system image img (mount
// and unmount: the kernel also finishes orphaned truncates, which e2fsck
// -n would report), checks it read-only with e2fsck -fn, then mounts it at
// mnt for inner.
func (r *rig) fsckAndMount(ctx context.Context, img, mnt string, inner func() []string) []string {
	t0 := time.Now()
	dev, err := attachLoop(img)
	if err != nil {
		return []string{err.Error()}
	}
	defer dev.release()
	if err := mountExt4(dev.path, mnt); err != nil {
		return []string{fmt.Sprintf("host ext4 does not mount (journal recovery): %v", err)}
	}
	if err := r.unmount(mnt); err != nil {
		return []string{err.Error()}
	}
	r.timing.add("recovery mount", t0)
	t0 = time.Now()
	var probs []string
	if _, err := r.command(ctx, "e2fsck", "-fn", dev.path); err != nil {
		probs = append(probs, fmt.Sprintf("e2fsck -fn on the host ext4: %v", err))
	}
	r.timing.add("e2fsck", t0)
	t0 = time.Now()
	if err := mountExt4(dev.path, mnt); err != nil {
		return append(probs, fmt.Sprintf("host ext4 does not mount after e2fsck: %v", err))
	}
	r.timing.add("mount", t0)
	probs = append(probs, inner()...)
	t0 = time.Now()
	if err := r.unmount(mnt); err != nil {
		probs = append(probs, err.Error())
	}
	r.timing.add("mount", t0)
	return probs
}

// syncDir makes a directory entry durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
