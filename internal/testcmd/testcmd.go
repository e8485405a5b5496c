// Package testcmd is what the project's tests use to run other programs:
// the reference tools (qemu-img, qemu-io, nbdinfo, mkfs, e2fsck, ...) and
// this test binary itself in a child mode. It exists so that the rules
// live in one place: a missing tool fails the test with the Debian package
// that has it (interop tests must never pass by not running), a failing
// command fails the test with everything it printed, and nothing waits
// without a bound.
package testcmd

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// packages names the Debian package of the tools tests use, for the
// message when one is missing.
var packages = map[string]string{
	"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils",
	"nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdsh": "libnbd-bin", "nbdkit": "nbdkit",
	"mkfs.ext4": "e2fsprogs", "e2fsck": "e2fsprogs", "resize2fs": "e2fsprogs", "tune2fs": "e2fsprogs",
	"mkfs.xfs": "xfsprogs", "xfs_repair": "xfsprogs", "xfs_growfs": "xfsprogs", "xfs_admin": "xfsprogs",
	"repquota": "quota", "fio": "fio", "dmsetup": "dmsetup", "losetup": "util-linux",
}

// Path returns the path of an external program the test needs, failing
// (never skipping) when it is not installed.
func Path(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		pkg := packages[name]
		if pkg == "" {
			pkg = "the package that provides it"
		}
		t.Fatalf("%s is required by this test but is not installed (Debian: apt-get install %s; .ci/deps installs it): %v", name, pkg, err)
	}
	return p
}

// Need fails the test unless every named program is installed.
func Need(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		Path(t, n)
	}
}

// Timeout bounds every command these helpers run.
const Timeout = 5 * time.Minute

// Run runs a program and returns its standard output, failing the test
// with its output and error output when it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, Path(t, name), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// Combined runs a program and returns its output and error output
// together, failing the test when it fails.
func Combined(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, code := Status(t, name, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit status %d\n%s", name, strings.Join(args, " "), code, out)
	}
	return out
}

// Status runs a program and returns its combined output and exit status;
// only a program that could not run at all fails the test.
func Status(t testing.TB, name string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, Path(t, name), args...).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee) && ctx.Err() == nil:
		return string(out), ee.ExitCode()
	}
	t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	return "", -1
}

// WaitFor polls cond every 20 ms until it holds, returns an error, or the
// timeout passes; the last two fail the test. For state that only the
// kernel or another process changes and that nothing announces.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		<-tick.C
	}
}

// Child returns a command that runs this test binary again with only the
// test named test selected and env added to the environment: the way a
// test gets a process of its own to kill, or to run as another user. The
// child test must do nothing unless it finds its environment variable.
func Child(test string, env ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$")
	cmd.Env = append(os.Environ(), env...)
	return cmd
}
