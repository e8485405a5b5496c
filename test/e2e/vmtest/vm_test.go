package vmtest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// skipVMTest honours the developer opt-out for the tests below that boot VMs.
func skipVMTest(t *testing.T) {
	t.Helper()
	if why := SkipReason(); why != "" {
		t.Skip(why)
	}
}

// TestExec boots the VM once and checks what a guest command sees and that
// its output, exit status and files come back.
func TestExec(t *testing.T) {
	if InGuest() {
		return
	}
	skipVMTest(t)
	xchg := t.TempDir()
	if err := os.WriteFile(filepath.Join(xchg, "in"), []byte("from host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	script := `echo "cwd=$(pwd)"; echo "uid=$(id -u) home=$HOME tmpdir=$TMPDIR ci=$CI"
cat "$PLOOP_CSI_VM_EXCHANGE_DIR/in"
nsenter --mount=/proc/self/ns/mnt cat "$PLOOP_CSI_VM_EXCHANGE_DIR/in" | sed 's/^/setns: /'
echo "kernel=$(uname -r)"
for m in nbd loop ext4 xfs quota_v2 9p; do grep -q "^$m " /proc/modules && echo "module $m"; done
ls /dev/nbd15 && touch /run/lock/x /tmp/x /var/tmp/x && echo writable
echo to-stderr >&2
echo result > "$PLOOP_CSI_VM_EXCHANGE_DIR/out"
exit 7`
	var out bytes.Buffer
	t.Setenv("CI", "forwarded")
	res, err := Exec(context.Background(), Options{}, Command{
		Args:        []string{"sh", "-c", script},
		Dir:         "/usr/share",
		ExchangeDir: xchg,
		Output:      &out,
		Logf:        t.Logf,
	})
	t.Logf("guest output:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitStatus != 7 {
		t.Errorf("exit status %d, want 7", res.ExitStatus)
	}
	for _, want := range []string{"cwd=/usr/share", "uid=0 home=/root tmpdir=/tmp ci=forwarded", "from host",
		"setns: from host",
		"kernel=" + res.Kernel, "module nbd", "module loop", "module ext4", "module xfs", "module quota_v2", "module 9p",
		"/dev/nbd15", "writable", "to-stderr"} {
		if !strings.Contains(out.String(), want+"\n") {
			t.Errorf("guest output lacks line %q", want)
		}
	}
	if b, err := os.ReadFile(filepath.Join(xchg, "out")); err != nil || string(b) != "result\n" {
		t.Errorf("file written by the guest: %q, %v", b, err)
	}
	if res.BootToCommand <= 0 || res.Total < res.BootToCommand || (res.Accel != "kvm" && res.Accel != "tcg") {
		t.Errorf("implausible result %+v", res)
	}
}

// TestExecTimeout: a hanging guest is killed at the timeout and says so.
func TestExecTimeout(t *testing.T) {
	if InGuest() {
		return
	}
	skipVMTest(t)
	const timeout = 20 * time.Second
	start := time.Now()
	_, err := Exec(context.Background(), Options{Timeout: timeout}, Command{
		Args: []string{"sleep", "3600"},
		Logf: t.Logf,
	})
	took := time.Since(start)
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "qemu killed") {
		t.Fatalf("want a timeout error saying qemu was killed, got %v", err)
	}
	if took > timeout+10*time.Second {
		t.Errorf("Exec returned %v after a %v timeout", took, timeout)
	}
	t.Logf("error as reported: %v", err)
}

// TestExecQEMUMissing: without qemu the error says what to install.
func TestExecQEMUMissing(t *testing.T) {
	_, err := Exec(context.Background(), Options{QEMU: "/nonexistent/qemu-system-x86_64"}, Command{Args: []string{"true"}})
	if err == nil || !strings.Contains(err.Error(), "not found") || !strings.Contains(err.Error(), "install qemu-system-x86") {
		t.Fatalf("want a clear qemu-missing error, got %v", err)
	}
}

// TestKernelDownloadFailure: a kernel that apt cannot fetch gives an error
// that names the package and the step.
func TestKernelDownloadFailure(t *testing.T) {
	t.Setenv("PLOOP_CSI_CACHE", t.TempDir())
	t.Setenv("PLOOP_CSI_VM_KERNEL_PKG", "linux-image-0.0.0-no-such-kernel-amd64")
	_, err := prepareBoot(context.Background(), "", t.Logf)
	if err == nil || !strings.Contains(err.Error(), "linux-image-0.0.0-no-such-kernel-amd64") {
		t.Fatalf("unknown kernel package: got %v", err)
	}
	t.Logf("unknown package: %v", err)

	t.Setenv("PLOOP_CSI_VM_KERNEL_PKG", "")
	pkg, err := kernelPackage(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = downloadDeb(context.Background(), t.TempDir(), pkg, "0.0-no-such-version", t.Logf)
	if err == nil || !strings.Contains(err.Error(), "download kernel package "+pkg+"=0.0-no-such-version") {
		t.Fatalf("failed download: got %v", err)
	}
	t.Logf("failed download: %v", err)
}

// TestRun runs guest cases through Run, including the guest helpers.
func TestRun(t *testing.T) {
	Run(t, Options{Prepare: func(dir string) error {
		return os.WriteFile(filepath.Join(dir, "prepared"), []byte("yes"), 0o644)
	}}, []Case{
		{Name: "Environment", Run: func(t *testing.T) {
			if !InGuest() {
				t.Fatal("InGuest false in the guest")
			}
			if b, err := os.ReadFile(filepath.Join(ExchangeDir(), "prepared")); err != nil || string(b) != "yes" {
				t.Fatalf("Prepare's file: %q, %v", b, err)
			}
			if wd, _ := os.Getwd(); !strings.HasSuffix(wd, "test/e2e/vmtest") {
				t.Errorf("working dir %q is not the package dir", wd)
			}
		}},
		{Name: "ScratchFSExt4", Run: func(t *testing.T) { checkScratchFS(t, "ext4", 64, 0xef53) }},
		{Name: "ScratchFSXFS", Run: func(t *testing.T) { checkScratchFS(t, "xfs", 300, 0x58465342) }},
		{Name: "UnprivilegedUser", Run: func(t *testing.T) {
			cmd := exec.Command("sh", "-c", "id -u; id -g; touch /tmp/root-only/x")
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: UnprivilegedUID, Gid: UnprivilegedGID}}
			if err := os.Mkdir("/tmp/root-only", 0o755); err != nil {
				t.Fatal(err)
			}
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.HasPrefix(string(out), "65534\n65534\n") || !strings.Contains(string(out), "Permission denied") {
				t.Fatalf("unprivileged child: %v\n%s", err, out)
			}
		}},
	})
}

func checkScratchFS(t *testing.T, fstype string, sizeMiB int, magic int64) {
	mnt := ScratchFS(t, fstype, sizeMiB)
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != magic {
		t.Errorf("%s: statfs type %#x, want %#x", mnt, st.Type, magic)
	}
	if got := int64(st.Blocks) * st.Bsize; got > int64(sizeMiB)<<20 || got < int64(sizeMiB)<<19 {
		t.Errorf("%s: %d bytes, want about %d MiB", mnt, got, sizeMiB)
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 3 && f[1] == mnt {
			if !strings.Contains(f[3], "prjquota") {
				t.Errorf("%s mounted without prjquota: %s", mnt, line)
			}
			return
		}
	}
	t.Errorf("%s not in /proc/self/mounts", mnt)
}

// TestRunReportsGuestFailure: a failing guest case fails the host test, and
// the guest's own message reaches the host log.
func TestRunReportsGuestFailure(t *testing.T) {
	if InGuest() {
		return
	}
	skipVMTest(t)
	cmd := exec.Command(os.Args[0], "-test.run", "^TestFailingGuestFixture$", "-test.v")
	cmd.Env = append(os.Environ(), "PLOOP_CSI_VMTEST_FIXTURE=1")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("the fixture run should fail with an exit status, got %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "deliberate") || strings.Contains(line, "exited with status") {
			t.Logf("child: %s", strings.TrimSpace(line))
		}
	}
	for _, want := range []string{"deliberate guest failure", "guest test run exited with status 1", "--- FAIL: TestFailingGuestFixture"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("fixture output lacks %q:\n%s", want, out)
		}
	}
}

// TestFailingGuestFixture fails inside the guest on purpose; it only runs as
// TestRunReportsGuestFailure's child.
func TestFailingGuestFixture(t *testing.T) {
	if os.Getenv("PLOOP_CSI_VMTEST_FIXTURE") != "1" {
		return
	}
	Run(t, Options{}, []Case{{Name: "Fails", Run: func(t *testing.T) { t.Fatal("deliberate guest failure") }}})
}

// TestExecNetwork: with Options.Network the guest reaches the host's
// loopback only through its guest forwards, and the host reaches the
// guest only through its host forwards; any other address fails at once.
func TestExecNetwork(t *testing.T) {
	if InGuest() {
		return
	}
	skipVMTest(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello-from-host\n"))
			c.Close()
		}
	}()
	hostPort := lis.Addr().(*net.TCPAddr).Port
	fwd, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fwdPort := fwd.Addr().(*net.TCPAddr).Port
	fwd.Close() // qemu binds it
	xchg := t.TempDir()
	script := `set -u
x=$PLOOP_CSI_VM_EXCHANGE_DIR
ip -4 addr show dev eth0 | grep -o 'inet [0-9.]*'
echo "via-guestfwd=$(socat -T5 - TCP:192.0.2.100:80 </dev/null)"
timeout 10 socat -T5 - TCP:192.0.2.2:22 </dev/null && echo reached-gateway-port || echo gateway-refused
timeout 10 socat -T5 - TCP:10.0.2.2:80 </dev/null && echo reached-elsewhere || echo elsewhere-refused
socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo hello-from-guest' &
for i in $(seq 100); do socat -T1 - TCP:127.0.0.1:8080 </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
touch $x/listening
for i in $(seq 600); do [ -e $x/done ] && exit 0; sleep 0.1; done
exit 3`
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	got := make(chan string, 1)
	go func() {
		defer os.WriteFile(filepath.Join(xchg, "done"), nil, 0o644)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			if _, err := os.Stat(filepath.Join(xchg, "listening")); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				got <- "gave up: " + ctx.Err().Error()
				return
			case <-tick.C:
			}
		}
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(fwdPort), 10*time.Second)
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b, _ := io.ReadAll(c)
		got <- string(b)
	}()
	res, err := Exec(ctx, Options{Network: &Network{
		GuestFwd: []GuestFwd{{GuestAddr: "192.0.2.100:80", HostPort: hostPort}},
		HostFwd:  []HostFwd{{HostPort: fwdPort, GuestPort: 8080}},
	}}, Command{Args: []string{"sh", "-c", script}, ExchangeDir: xchg, Output: &out, Logf: t.Logf})
	t.Logf("guest output:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitStatus != 0 {
		t.Errorf("guest exit status %d", res.ExitStatus)
	}
	for _, want := range []string{"inet " + GuestIP, "via-guestfwd=hello-from-host", "gateway-refused", "elsewhere-refused"} {
		if !strings.Contains(out.String(), want+"\n") {
			t.Errorf("guest output lacks line %q", want)
		}
	}
	if g := <-got; g != "hello-from-guest\n" {
		t.Errorf("through the host forward: %q", g)
	}
}
