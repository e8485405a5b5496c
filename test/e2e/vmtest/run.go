package vmtest

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Case is one check that runs inside the guest, as root.
type Case struct {
	Name string
	Run  func(t *testing.T)
}

// InGuest reports whether this process runs inside the vmtest guest.
func InGuest() bool { return os.Getenv("PLOOP_CSI_IN_VM") == "1" }

// ExchangeDir is the directory shared writable between host and guest, at
// the same path on both sides. Empty outside a vmtest guest.
func ExchangeDir() string { return os.Getenv("PLOOP_CSI_VM_EXCHANGE_DIR") }

// SkipReason returns why VM tests are skipped, or "" when they must run:
// only an explicit PLOOP_CSI_SKIP_VM=1 outside CI skips them.
func SkipReason() string {
	if os.Getenv("PLOOP_CSI_SKIP_VM") == "1" && os.Getenv("CI") != "true" {
		return "PLOOP_CSI_SKIP_VM=1: VM tests skipped by request (never honoured when CI=true)"
	}
	return ""
}

// Run runs cases against the guest kernel. On the host it boots one VM and
// re-runs the current test (t.Name()) of this test binary inside it; the
// guest's output streams to the test log and any failure there, a failed
// boot or a timeout fails t. In the guest it runs each case as a subtest.
func Run(t *testing.T, opts Options, cases []Case) {
	t.Helper()
	if InGuest() {
		for _, c := range cases {
			t.Run(c.Name, c.Run)
		}
		return
	}
	if why := SkipReason(); why != "" {
		t.Skip(why)
	}

	xchg := t.TempDir()
	// The guest's unprivileged user must reach binaries and data in it.
	if err := os.Chmod(xchg, 0o755); err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("vmtest: find the test binary: %v", err)
	}
	bin := filepath.Join(xchg, filepath.Base(self))
	if err := copyFile(self, bin, 0o755); err != nil {
		t.Fatalf("vmtest: copy the test binary into the exchange dir: %v", err)
	}
	if opts.Prepare != nil {
		if err := opts.Prepare(xchg); err != nil {
			t.Fatalf("vmtest: Prepare: %v", err)
		}
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatalf("vmtest: %v", err)
	}

	cfg, err := resolveOptions(opts)
	if err != nil {
		t.Fatal(err)
	}
	timeout := cfg.Timeout
	if dl, ok := t.Deadline(); ok {
		// Leave the host test time to report instead of being killed by go test.
		if left := time.Until(dl) - 30*time.Second; left < timeout {
			timeout = max(left, time.Second)
		}
	}
	opts.Timeout = timeout

	// The guest's own test timeout fires first so that its panic (which names
	// the hung test) reaches the console before qemu is killed; the margin
	// also covers the boot, which a loaded machine stretches to a minute.
	guestTimeout := timeout - max(timeout/5, 30*time.Second)
	if guestTimeout < timeout/2 {
		guestTimeout = timeout / 2
	}
	hostRun := ""
	if f := flag.Lookup("test.run"); f != nil {
		hostRun = f.Value.String()
	}
	args := []string{bin, "-test.run", guestRunPattern(t.Name(), hostRun), "-test.v",
		"-test.timeout", guestTimeout.String()}
	if testing.Short() {
		args = append(args, "-test.short")
	}
	opts.Env = append(append([]string{}, opts.Env...), "PLOOP_CSI_IN_VM=1")

	out := newTestLogWriter(t.Log)
	res, err := Exec(context.Background(), opts, Command{
		Args:        args,
		Dir:         wd,
		ExchangeDir: xchg,
		Output:      out,
		Logf:        t.Logf,
	})
	out.flush()
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitStatus != 0 {
		// A CI log shows only the head and the tail of a run: repeat what
		// failed in the guest where the host's failure message is read.
		t.Fatalf("vmtest: guest test run exited with status %d (its output is above)%s", res.ExitStatus, out.failures())
	}
}

// testRunPattern is a -test.run pattern selecting exactly the test name
// (subtest levels are matched one by one).
func testRunPattern(name string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	return strings.Join(parts, "/")
}

// guestRunPattern selects the current test in the guest and, when the host
// run was narrowed to some cases (go test -run 'TestKernel/Resize'), only
// those: the part of the host's pattern after its first "/" is kept.
func guestRunPattern(name, hostRun string) string {
	p := testRunPattern(name)
	if _, sub, ok := strings.Cut(hostRun, "/"); ok && sub != "" && !strings.Contains(name, "/") {
		p += "/" + sub
	}
	return p
}

// testLogWriter turns the guest's output into t.Log lines and remembers,
// per guest test, its last lines, so that the failures can be repeated in
// one message at the end.
type testLogWriter struct {
	log func(args ...any)
	buf []byte
	// current is the guest test the next lines belong to, as go test -v's
	// "=== RUN/CONT/NAME" headers say.
	current string
	last    map[string][]string
	failed  []string
}

// failureLines is how many of a failed guest test's last lines are
// repeated, and lineLimit how much of each.
const (
	failureLines = 4
	lineLimit    = 300
)

func newTestLogWriter(log func(args ...any)) *testLogWriter {
	return &testLogWriter{log: log, last: map[string][]string{}}
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := strings.IndexByte(string(w.buf), '\n')
		if i < 0 {
			return len(p), nil
		}
		w.line(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}

func (w *testLogWriter) flush() {
	if len(w.buf) > 0 {
		w.line(string(w.buf))
		w.buf = nil
	}
}

func (w *testLogWriter) line(l string) {
	w.log("guest: " + l)
	trimmed := strings.TrimSpace(l)
	for _, h := range []string{"=== RUN ", "=== CONT ", "=== NAME ", "=== PAUSE "} {
		if name, ok := strings.CutPrefix(trimmed, h); ok {
			w.current = strings.TrimSpace(name)
			return
		}
	}
	if strings.HasPrefix(l, "--- ") {
		// A top-level result: what follows is the test binary's, not a test's.
		w.current = ""
	}
	if rest, ok := strings.CutPrefix(trimmed, "--- FAIL: "); ok {
		name, _, _ := strings.Cut(rest, " ")
		w.failed = append(w.failed, name)
		return
	}
	if w.current == "" || trimmed == "" || strings.HasPrefix(trimmed, "--- ") {
		return
	}
	if len(trimmed) > lineLimit {
		trimmed = trimmed[:lineLimit] + "…"
	}
	ls := append(w.last[w.current], trimmed)
	if len(ls) > failureLines {
		ls = ls[len(ls)-failureLines:]
	}
	w.last[w.current] = ls
}

// failures names the guest tests that failed, innermost only, each with
// its last lines; "" when the guest reported none.
func (w *testLogWriter) failures() string {
	var b strings.Builder
	for _, name := range w.failed {
		leaf := true
		for _, other := range w.failed {
			if strings.HasPrefix(other, name+"/") {
				leaf = false
			}
		}
		if !leaf {
			continue
		}
		fmt.Fprintf(&b, "\n\tguest %s failed; its last lines:", name)
		for _, l := range w.last[name] {
			b.WriteString("\n\t\t" + l)
		}
	}
	return b.String()
}

// UnprivilegedUID and UnprivilegedGID ("nobody") are a user without
// CAP_SYS_RESOURCE, which quota limits; run a child process with
// SysProcAttr.Credential{Uid: UnprivilegedUID, Gid: UnprivilegedGID}.
const (
	UnprivilegedUID = 65534
	UnprivilegedGID = 65534
)

// mustGuest fails t when called outside the guest: the guest helpers change
// the kernel's state (loop devices, mounts) and must not touch the host's.
func mustGuest(t testing.TB, helper string) {
	t.Helper()
	if !InGuest() {
		t.Fatalf("vmtest.%s called outside the VM guest (call it only inside a vmtest.Case)", helper)
	}
}

// fmtErr formats a command failure with its combined output.
func fmtErr(what string, err error, out []byte) error {
	return fmt.Errorf("%s: %w: %s", what, err, strings.TrimSpace(string(out)))
}
