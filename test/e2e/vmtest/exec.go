package vmtest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Options configure the VM. The zero value is a sensible default.
type Options struct {
	// MemoryMiB is the guest's RAM: default $PLOOP_CSI_VM_MEM, else 2048.
	MemoryMiB int
	// CPUs is the guest's CPU count: default $PLOOP_CSI_VM_CPUS, else 2.
	CPUs int
	// Timeout bounds the whole VM run, boot included; qemu is killed when it
	// expires. Default 10 minutes (Run also stays within the test deadline).
	Timeout time.Duration
	// Prepare runs on the host before boot with the exchange directory, e.g.
	// to build helper binaries into it.
	Prepare func(exchangeDir string) error

	// Accel is "kvm" or "tcg": default $PLOOP_CSI_VM_ACCEL, else kvm when
	// /dev/kvm opens read-write, else tcg.
	Accel string
	// QEMU is the emulator binary: default qemu-system-x86_64 from PATH.
	QEMU string
	// Env adds KEY=VALUE pairs to the guest command's environment.
	Env []string
	// Network, when set, gives the guest a NIC (eth0, GuestIP) on qemu's
	// user network with restrict=on: the guest reaches nothing but the
	// GuestFwd addresses, and nothing reaches it but the HostFwd ports.
	// Without it the guest has only loopback.
	Network *Network
	// Kernel is the Debian kernel package, or meta-package, to boot
	// (Kernel612 for ublk): default $PLOOP_CSI_VM_KERNEL_PKG, else the
	// current stock kernel.
	Kernel string
}

// Network is the guest's restricted link to the host's loopback.
type Network struct {
	// GuestFwd relays each connection the guest opens to an address of
	// the guest net (GuestNet) to a port on the host's 127.0.0.1, through
	// a socat spawned per connection.
	GuestFwd []GuestFwd
	// HostFwd relays connections to ports on the host's 127.0.0.1 to
	// ports of the guest.
	HostFwd []HostFwd
}

// GuestFwd maps GuestAddr (IP:port on GuestNet) to the host's
// 127.0.0.1:HostPort.
type GuestFwd struct {
	GuestAddr string
	HostPort  int
}

// HostFwd maps the host's 127.0.0.1:HostPort to the guest's GuestPort.
type HostFwd struct {
	HostPort, GuestPort int
}

// The guest net: a documentation range (RFC 5737) that exists only
// inside qemu; the host side never sends to it.
const (
	GuestNet  = "192.0.2.0/24"
	GuestIP   = "192.0.2.15"
	GatewayIP = "192.0.2.2"
)

// nicArg is qemu's -nic value for n.
func (n *Network) nicArg() (string, error) {
	if _, err := exec.LookPath("socat"); err != nil && len(n.GuestFwd) > 0 {
		return "", fmt.Errorf("vmtest: a guest forward needs socat on the host (see .ci/deps): %w", err)
	}
	a := "user,model=virtio-net-pci,restrict=on,net=" + GuestNet + ",host=" + GatewayIP + ",dhcpstart=" + GuestIP
	for _, f := range n.GuestFwd {
		if strings.ContainsAny(f.GuestAddr, ", ") || f.HostPort <= 0 || f.HostPort > 65535 {
			return "", fmt.Errorf("vmtest: guest forward %q -> %d", f.GuestAddr, f.HostPort)
		}
		a += fmt.Sprintf(",guestfwd=tcp:%s-cmd:socat - TCP:127.0.0.1:%d", f.GuestAddr, f.HostPort)
	}
	for _, f := range n.HostFwd {
		if f.HostPort <= 0 || f.HostPort > 65535 || f.GuestPort <= 0 || f.GuestPort > 65535 {
			return "", fmt.Errorf("vmtest: host forward %d -> %d", f.HostPort, f.GuestPort)
		}
		a += fmt.Sprintf(",hostfwd=tcp:127.0.0.1:%d-%s:%d", f.HostPort, GuestIP, f.GuestPort)
	}
	return a, nil
}

// Command is what Exec runs in the guest, as root, chrooted into the host's
// root file system.
type Command struct {
	Args []string
	// Dir is the working directory in the guest (a host path; the host root
	// is visible read-only). Default "/".
	Dir string
	// ExchangeDir is a host directory shared writable with the guest at the
	// same path. Empty: Exec makes a temporary one and removes it afterwards.
	ExchangeDir string
	// Output receives the guest command's stdout and stderr (they share the
	// serial console), plus kernel messages printed meanwhile.
	Output io.Writer
	// Logf receives the harness's own progress lines; nil discards them.
	Logf func(format string, args ...any)
}

// Result describes a finished guest run.
type Result struct {
	ExitStatus    int           // the guest command's exit status
	Accel         string        // "kvm" or "tcg"
	Kernel        string        // the guest's kernel release
	BootToCommand time.Duration // qemu start until the command started
	Total         time.Duration // qemu start until qemu exited
}

// ErrTimeout is wrapped by Exec's error when the VM ran out of time.
var ErrTimeout = errors.New("VM timed out")

// Exec boots a VM, runs cmd in it and returns the command's exit status in
// Result. The error is non-nil only when the harness failed (qemu missing,
// kernel download failing, boot failing, timeout); a command that fails is a
// successful Exec with a non-zero ExitStatus.
func Exec(ctx context.Context, opts Options, cmd Command) (Result, error) {
	logf := cmd.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	if len(cmd.Args) == 0 {
		return Result{}, errors.New("vmtest: no command to run")
	}
	cfg, err := resolveOptions(opts)
	if err != nil {
		return Result{}, err
	}
	qemu, err := exec.LookPath(cfg.QEMU)
	if err != nil {
		return Result{}, fmt.Errorf("vmtest: %s not found: install qemu-system-x86 (see .ci/deps), or set PLOOP_CSI_SKIP_VM=1 to skip VM tests on a developer machine: %w", cfg.QEMU, err)
	}

	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	prepStart := time.Now()
	boot, err := prepareBoot(ctx, cfg.Kernel, logf)
	if err != nil {
		return Result{}, fmt.Errorf("vmtest: prepare guest kernel: %w", err)
	}
	if d := time.Since(prepStart); d > time.Second {
		logf("vmtest: guest kernel and initramfs ready in %v", d.Round(time.Millisecond))
	}

	xchg := cmd.ExchangeDir
	if xchg == "" {
		xchg, err = os.MkdirTemp("", "vmtest-")
		if err != nil {
			return Result{}, fmt.Errorf("vmtest: create exchange dir: %w", err)
		}
		defer os.RemoveAll(xchg)
		// The guest's unprivileged user needs to reach files in it.
		if err := os.Chmod(xchg, 0o755); err != nil {
			return Result{}, fmt.Errorf("vmtest: %w", err)
		}
	}
	xchg, err = checkGuestPath("exchange dir", xchg)
	if err != nil {
		return Result{}, err
	}
	dir := cmd.Dir
	if dir == "" {
		dir = "/"
	}
	if dir, err = checkGuestPath("working dir", dir); err != nil {
		return Result{}, err
	}
	if err := writeCommandScript(xchg, dir, guestEnv(cfg.Env, xchg), cmd.Args); err != nil {
		return Result{}, err
	}

	nonce, err := newNonce()
	if err != nil {
		return Result{}, err
	}
	args := qemuArgs(cfg, boot, xchg, nonce, hiddenHostDir(dir, xchg))
	logf("vmtest: booting %s (%s): accel %s (%s), %d CPUs, %d MiB", boot.Release, boot.Package, cfg.Accel, cfg.AccelWhy, cfg.CPUs, cfg.MemoryMiB)

	q := exec.CommandContext(ctx, qemu, args...)
	// qemu dies with this process even when go test kills it on a timeout.
	// The death signal follows the starting OS thread, so hold this
	// goroutine on its thread until qemu has been waited for.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	q.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	q.Stdin = nil
	stderr := &tailBuffer{max: 4096}
	q.Stderr = stderr
	stdout, err := q.StdoutPipe()
	if err != nil {
		return Result{}, fmt.Errorf("vmtest: %w", err)
	}
	q.WaitDelay = 5 * time.Second
	start := time.Now()
	if err := q.Start(); err != nil {
		return Result{}, fmt.Errorf("vmtest: start %s: %w", qemu, err)
	}

	res := Result{Accel: cfg.Accel, Kernel: boot.Release}
	var bootLog io.Writer
	if cfg.Debug {
		bootLog = cmd.Output
	}
	st := readConsole(stdout, nonce, cmd.Output, bootLog, start)
	waitErr := q.Wait()
	res.Total = time.Since(start)
	res.BootToCommand = st.bootToCommand
	if st.started {
		logf("vmtest: %s: boot to command %v, total %v", res.Accel,
			res.BootToCommand.Round(time.Millisecond), res.Total.Round(time.Millisecond))
	}

	tail := func() string {
		s := strings.Join(st.noise.lines(), "\n")
		if strings.TrimSpace(s) == "" {
			s = "(none; PLOOP_CSI_VM_DEBUG=1 shows the whole boot)"
		}
		if e := strings.TrimSpace(stderr.String()); e != "" {
			s += "\nqemu stderr: " + e
		}
		return s
	}
	switch {
	case ctx.Err() != nil && !st.exited:
		phase := "before the guest command started (boot hung?)"
		if st.started {
			phase = "while the guest command was running (it hung?)"
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return res, fmt.Errorf("vmtest: %w: no result within %v, %s; qemu killed. Last console lines:\n%s", ErrTimeout, cfg.Timeout, phase, tail())
		}
		return res, fmt.Errorf("vmtest: cancelled %s; qemu killed: %w", phase, ctx.Err())
	case st.initFail != "":
		return res, fmt.Errorf("vmtest: guest init failed: %s. Last console lines:\n%s", st.initFail, tail())
	case !st.started:
		return res, fmt.Errorf("vmtest: VM stopped before the guest command started (qemu: %v). Last console lines:\n%s", waitErr, tail())
	case !st.exited:
		return res, fmt.Errorf("vmtest: VM stopped while the guest command was running, without an exit status (kernel panic?) (qemu: %v). Last console lines:\n%s", waitErr, tail())
	}
	res.ExitStatus = st.status
	logf("vmtest: guest command exit status %d", res.ExitStatus)
	return res, nil
}

// config is Options with defaults and environment applied.
type config struct {
	Options
	AccelWhy string // why Accel was chosen, for the log
	Debug    bool   // $PLOOP_CSI_VM_DEBUG=1: show the boot console and kernel log
	nic      string // qemu's -nic value of Network; "" for none
}

func resolveOptions(o Options) (config, error) {
	c := config{Options: o}
	var err error
	if c.MemoryMiB == 0 {
		if c.MemoryMiB, err = envInt("PLOOP_CSI_VM_MEM", 2048); err != nil {
			return c, err
		}
	}
	if c.CPUs == 0 {
		if c.CPUs, err = envInt("PLOOP_CSI_VM_CPUS", 2); err != nil {
			return c, err
		}
	}
	if c.MemoryMiB < 256 || c.CPUs < 1 || c.CPUs > 64 {
		return c, fmt.Errorf("vmtest: need at least 256 MiB and 1..64 CPUs, got %d MiB, %d CPUs", c.MemoryMiB, c.CPUs)
	}
	c.Debug = os.Getenv("PLOOP_CSI_VM_DEBUG") == "1"
	if c.Network != nil {
		if c.nic, err = c.Network.nicArg(); err != nil {
			return c, err
		}
	}
	if c.Timeout == 0 {
		c.Timeout = 10 * time.Minute
	}
	if c.QEMU == "" {
		c.QEMU = "qemu-system-x86_64"
	}
	if c.Accel == "" {
		c.Accel = os.Getenv("PLOOP_CSI_VM_ACCEL")
	}
	switch c.Accel {
	case "":
		c.Accel, c.AccelWhy = "kvm", "/dev/kvm opens read-write"
		if err := kvmUsable(); err != nil {
			c.Accel, c.AccelWhy = "tcg", err.Error()
		} else if err := kvmBootsStockKernels(); err != nil {
			c.Accel, c.AccelWhy = "tcg", err.Error()+"; PLOOP_CSI_VM_ACCEL=kvm forces it"
		}
	case "tcg":
		c.AccelWhy = "requested"
	case "kvm":
		if err := kvmUsable(); err != nil {
			return c, fmt.Errorf("vmtest: KVM requested but not usable: %w", err)
		}
		c.AccelWhy = "requested"
	default:
		return c, fmt.Errorf("vmtest: unknown accelerator %q (want kvm or tcg)", c.Accel)
	}
	return c, nil
}

func envInt(name string, def int) (int, error) {
	s := os.Getenv(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("vmtest: %s=%q: %w", name, s, err)
	}
	return n, nil
}

func kvmUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// kvmBootsStockKernels rules out KVM implementations that cannot run an
// unmodified kernel at a useful speed. kvm_pvm (pagetable-based virtual
// machines, found in some sandboxes that nest VMs without hardware support)
// serves /dev/kvm, but Debian's kernel spent minutes in its decompressor
// under it without printing a line, where TCG boots in seconds.
func kvmBootsStockKernels() error {
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return errors.New("/dev/kvm is kvm_pvm, which does not boot a stock kernel in reasonable time")
	}
	return nil
}

func qemuArgs(c config, bootFiles bootFiles, xchg, nonce, keep string) []string {
	cmdline := "console=ttyS0 quiet panic=-1 mitigations=off rdinit=/init vmtest.xchg=" + xchg + " vmtest.nonce=" + nonce
	if c.Debug {
		cmdline = strings.Replace(cmdline, "quiet", "loglevel=7 vmtest.debug=1", 1)
	}
	if keep != "" {
		cmdline += " vmtest.keep=" + keep
	}
	// The read-only host root is cached in the guest (cache=loose): exec-
	// heavy tests ran 3x faster under TCG than with 9p's uncached default.
	// PLOOP_CSI_VM_ROOTCACHE=none shows host changes made during the run.
	if rc := os.Getenv("PLOOP_CSI_VM_ROOTCACHE"); rc != "" {
		cmdline += " vmtest.rootcache=" + rc
	}
	nic := "none"
	if c.nic != "" {
		nic = c.nic
		cmdline += " vmtest.net=1"
	}
	cpu := "max"
	if c.Accel == "kvm" {
		// arch-capabilities: some nested KVMs refuse its MSR and abort qemu.
		cpu = "host,-arch-capabilities"
	}
	// Without root, qemu cannot give files the guest's owners; "none"
	// then keeps the exchange share writable instead of failing creates.
	xchgModel := "none"
	if os.Geteuid() == 0 {
		xchgModel = "passthrough"
	}
	boot := []string{"-kernel", bootFiles.Kernel}
	if _, err := os.Stat(bootFiles.PVHKernel); err == nil {
		boot = []string{"-kernel", bootFiles.PVHKernel}
	}
	// qboot (from qemu-system-data) starts faster than SeaBIOS.
	if _, err := os.Stat("/usr/share/qemu/qboot.rom"); err == nil {
		boot = append(boot, "-bios", "/usr/share/qemu/qboot.rom")
	}
	return append(boot,
		"-accel", c.Accel,
		"-cpu", cpu,
		"-m", strconv.Itoa(c.MemoryMiB),
		"-smp", strconv.Itoa(c.CPUs),
		"-nodefaults", "-no-user-config",
		"-nographic", "-serial", "stdio",
		"-nic", nic,
		"-no-reboot",
		"-initrd", bootFiles.Initramfs,
		"-append", cmdline,
		"-device", "virtio-rng-pci",
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
		"-virtfs", "local,path="+xchg+",mount_tag=xchg,security_model="+xchgModel,
	)
}

// hiddenHostDir returns the top directory below /tmp, /var/tmp or /run that
// holds dir, which the guest must show from the host although it mounts
// tmpfs there; "" when dir is elsewhere or in the exchange dir.
func hiddenHostDir(dir, xchg string) string {
	if dir == xchg || strings.HasPrefix(dir, xchg+"/") {
		return ""
	}
	for _, top := range []string{"/tmp/", "/var/tmp/", "/run/"} {
		if rest, ok := strings.CutPrefix(dir, top); ok && rest != "" {
			first, _, _ := strings.Cut(rest, "/")
			return top + first
		}
	}
	return ""
}

// checkGuestPath makes p absolute and refuses characters that would not
// survive the kernel command line or the guest's shell scripts.
func checkGuestPath(what, p string) (string, error) {
	p, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("vmtest: %s: %w", what, err)
	}
	for _, r := range p {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._-+@%,=:", r)
		if !ok {
			return "", fmt.Errorf("vmtest: %s %q: only letters, digits and /._-+@%%,=: are supported in paths shared with the guest", what, p)
		}
	}
	return p, nil
}

// guestEnv is the guest command's whole environment: a sane base, CI and
// PLOOP_CSI_* from the host, then extra.
func guestEnv(extra []string, xchg string) []string {
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
		"TMPDIR=/tmp",
		"LANG=C.UTF-8",
		"TERM=dumb",
		"USER=root",
	}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "CI=") || strings.HasPrefix(kv, "PLOOP_CSI_") {
			env = append(env, kv)
		}
	}
	env = append(env, extra...)
	return append(env, "PLOOP_CSI_VM_EXCHANGE_DIR="+xchg)
}

func writeCommandScript(xchg, dir string, env, args []string) error {
	var b strings.Builder
	b.WriteString("# generated by test/e2e/vmtest: the guest init runs this in the chroot\n")
	fmt.Fprintf(&b, "cd %s || { echo \"vmtest: cannot cd to %s in the guest\"; exit 125; }\n", shellQuote(dir), dir)
	b.WriteString("exec /usr/bin/env -i")
	for _, kv := range env {
		b.WriteString(" " + shellQuote(kv))
	}
	for _, a := range args {
		b.WriteString(" " + shellQuote(a))
	}
	b.WriteString("\n")
	p := filepath.Join(xchg, guestCommandScript)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("vmtest: write guest command: %w", err)
	}
	return nil
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func newNonce() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("vmtest: nonce: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// consoleState is what the console said about the guest command.
type consoleState struct {
	started, exited bool
	status          int
	initFail        string
	bootToCommand   time.Duration
	noise           *lineRing // console lines outside the command, for errors
}

// readConsole follows the serial console until EOF: lines between the start
// and exit markers go to out, the rest is kept for error messages.
// With bootLog set, the other lines are copied there too, as they come.
func readConsole(r io.Reader, nonce string, out, bootLog io.Writer, start time.Time) consoleState {
	st := consoleState{noise: &lineRing{max: 40}}
	br := bufio.NewReader(r)
	// The init prints a newline before the exit marker in case the command's
	// output did not end with one; an empty line right before it is dropped.
	heldEmpty := false
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			line = strings.TrimSuffix(line, "\n")
			for _, ev := range parseConsoleLine(nonce, line) {
				switch ev.Event {
				case eventOutput:
					if st.started && !st.exited {
						if heldEmpty && out != nil {
							fmt.Fprintln(out)
						}
						heldEmpty = ev.Text == ""
						if !heldEmpty && out != nil {
							fmt.Fprintln(out, ev.Text)
						}
					} else {
						st.noise.add(ev.Text)
						if bootLog != nil {
							fmt.Fprintf(bootLog, "%.3fs console: %s\n", time.Since(start).Seconds(), ev.Text)
						}
					}
				case eventStart:
					if !st.started {
						st.started = true
						st.bootToCommand = time.Since(start)
					}
				case eventExit:
					if st.started && !st.exited {
						st.exited = true
						st.status = ev.Status
					}
				case eventInitFail:
					st.initFail = ev.Text
				}
			}
		}
		if err != nil {
			return st
		}
	}
}

// lineRing keeps the last max lines.
type lineRing struct {
	max int
	buf []string
}

func (r *lineRing) add(s string) {
	if s == "" && len(r.buf) == 0 {
		return
	}
	r.buf = append(r.buf, s)
	if len(r.buf) > r.max {
		r.buf = r.buf[len(r.buf)-r.max:]
	}
}

func (r *lineRing) lines() []string { return r.buf }

// tailBuffer is an io.Writer keeping the last max bytes (qemu's stderr).
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = t.b[len(t.b)-t.max:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
