package main

import (
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

var (
	serveBinOnce sync.Once
	serveBin     string
	serveBinErr  error
)

// servePloopctl builds ploopctl once per test run: serve is tested as a
// separate process because it reacts to signals.
func servePloopctl(t *testing.T) string {
	t.Helper()
	serveBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ploopctl-serve-test-")
		if err != nil {
			serveBinErr = err
			return
		}
		serveBin = filepath.Join(dir, "ploopctl")
		out, err := exec.Command("go", "build", "-o", serveBin, ".").CombinedOutput()
		if err != nil {
			serveBinErr = err
			serveBin = string(out)
		}
	})
	if serveBinErr != nil {
		t.Fatalf("build ploopctl: %v\n%s", serveBinErr, serveBin)
	}
	return serveBin
}

func serveNeed(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required for this test (Debian: qemu-utils, libnbd-bin): %v", tool, err)
		}
	}
}

func serveRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// startServe runs `ploopctl serve args...` and returns the URI it prints
// and a stop function that sends SIGTERM and returns the exit code.
func startServe(t *testing.T, args ...string) (uri string, stop func() int) {
	t.Helper()
	var stderr bytes.Buffer
	cmd, out, uri := startServeCmd(t, &stderr, args...)
	stopped := false
	stop = func() int {
		stopped = true
		cmd.Process.Signal(syscall.SIGTERM)
		go io.Copy(io.Discard, out)
		err := cmd.Wait()
		if stderr.Len() > 0 {
			t.Logf("ploopctl serve stderr: %s", stderr.String())
		}
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		return 0
	}
	t.Cleanup(func() {
		if !stopped {
			stop()
		}
	})
	return uri, stop
}

// startCmd starts bin with args, its stderr going to stderr, and returns
// it with its stdout.
func startCmd(t *testing.T, stderr *bytes.Buffer, bin string, args ...string) (*exec.Cmd, io.ReadCloser) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stderr = stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, out
}

// startServeCmd starts `ploopctl serve args...` and returns the process,
// its stdout (past the URI line) and the URI. stderr, when not nil,
// collects the process's stderr.
func startServeCmd(t *testing.T, stderr *bytes.Buffer, args ...string) (*exec.Cmd, io.ReadCloser, string) {
	t.Helper()
	if stderr == nil {
		stderr = new(bytes.Buffer)
	}
	cmd, out := startCmd(t, stderr, servePloopctl(t), append([]string{"serve"}, args...)...)
	// One byte at a time, so nothing past the URI line is consumed.
	var line []byte
	b := make([]byte, 1)
	for {
		if _, err := out.Read(b); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("ploopctl serve printed no URI: %v\nstderr: %s", err, stderr.String())
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
	}
	return cmd, out, strings.TrimSpace(string(line))
}

func TestServePloopImage(t *testing.T) {
	serveNeed(t, "qemu-img", "qemu-io", "nbdinfo")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.hds")
	serveRun(t, "qemu-img", "create", "-f", "parallels", img, "64M")
	sock := filepath.Join(dir, "s.sock")
	uri, stop := startServe(t, "--socket", sock, "--export", "vol", img)
	if want := "nbd+unix:///vol?socket=" + sock; uri != want {
		t.Fatalf("URI %q, want %q", uri, want)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	info := serveRun(t, "nbdinfo", "--json", uri)
	if !strings.Contains(info, `"export-size": 67108864`) || !strings.Contains(info, `"export-name": "vol"`) {
		t.Errorf("nbdinfo --json:\n%s", info)
	}
	serveRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x7e 3M 1M", "-c", "flush", uri)
	m := serveRun(t, "nbdinfo", "--map", uri)
	if !strings.Contains(m, "3145728     1048576    0  data") && !strings.Contains(strings.Join(strings.Fields(m), " "), "3145728 1048576 0 data") {
		t.Errorf("nbdinfo --map does not show the written cluster as data:\n%s", m)
	}
	if code := stop(); code != 0 {
		t.Fatalf("ploopctl serve exited %d after SIGTERM", code)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	// Closed cleanly: qemu-img finds no problems and reads the data.
	serveRun(t, "qemu-img", "check", "-f", "parallels", img)
	serveRun(t, "qemu-io", "-f", "parallels", "-r", "-c", "read -P 0x7e 3M 1M", "-c", "read -P 0 0 3M", img)
}

func TestServeRawTCPReadOnly(t *testing.T) {
	serveNeed(t, "qemu-io", "nbdinfo")
	raw := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(raw, bytes.Repeat([]byte{0x11}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	uri, stop := startServe(t, "--listen", ":0", "--read-only", raw)
	if !strings.HasPrefix(uri, "nbd://127.0.0.1:") || !strings.HasSuffix(uri, "/disk.raw") {
		t.Fatalf("URI %q: want loopback TCP and the file name as export", uri)
	}
	info := serveRun(t, "nbdinfo", "--json", uri)
	if !strings.Contains(info, `"is_read_only": true`) || !strings.Contains(info, `"export-size": 1048576`) {
		t.Errorf("nbdinfo --json:\n%s", info)
	}
	serveRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 1M", uri)
	out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write 0 4k", uri).CombinedOutput()
	if err == nil && !strings.Contains(string(out), "denied") && !strings.Contains(string(out), "not permitted") {
		t.Errorf("write to a read-only export succeeded:\n%s", out)
	}
	if code := stop(); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

func TestServeUsage(t *testing.T) {
	tests := []struct {
		args []string
		want int
	}{
		{[]string{"serve"}, exitUsage},
		{[]string{"serve", "--help"}, exitOK},
		{[]string{"serve", "x"}, exitUsage},
		{[]string{"serve", "--socket", "a", "--listen", ":1", "x"}, exitUsage},
		{[]string{"serve", "--socket", "/nonexistent/s", "/nonexistent/img"}, exitFail},
		{[]string{"attach"}, exitUsage},
		{[]string{"attach", "--help"}, exitOK},
		{[]string{"attach", "--connections", "0", "x"}, exitUsage},
		{[]string{"attach", "--device", "/dev/sda", "x"}, exitUsage},
		{[]string{"detach"}, exitUsage},
		{[]string{"detach", "--help"}, exitOK},
		{[]string{"detach", "/dev/loop0"}, exitUsage},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var out, errb bytes.Buffer
			if got := run(tc.args, &out, &errb); got != tc.want {
				t.Errorf("exit %d, want %d; stderr: %s", got, tc.want, errb.String())
			}
		})
	}
}

func TestLoopbackDefault(t *testing.T) {
	for in, want := range map[string]string{":10809": "127.0.0.1:10809", "[::1]:5": "[::1]:5", "0.0.0.0:7": "0.0.0.0:7"} {
		if got, err := loopbackDefault(in); err != nil || got != want {
			t.Errorf("loopbackDefault(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := loopbackDefault("nonsense"); err == nil {
		t.Error("loopbackDefault accepted an address without a port")
	}
}

func TestListenAddr(t *testing.T) {
	tests := []struct {
		listen      string
		allowRemote bool
		want        string // "" = refused
	}{
		{":10809", false, "127.0.0.1:10809"},
		{"127.0.0.1:1", false, "127.0.0.1:1"},
		{"127.8.9.10:1", false, "127.8.9.10:1"},
		{"[::1]:1", false, "[::1]:1"},
		{"localhost:1", false, "localhost:1"},
		{"0.0.0.0:1", false, ""},
		{"[::]:1", false, ""},
		{"192.0.2.7:1", false, ""},
		{"nbd.example.com:1", false, ""},
		{"0.0.0.0:1", true, "0.0.0.0:1"},
		{"192.0.2.7:1", true, "192.0.2.7:1"},
		{"nonsense", true, ""},
	}
	for _, tc := range tests {
		got, err := listenAddr(tc.listen, tc.allowRemote)
		if (err != nil) != (tc.want == "") || got != tc.want {
			t.Errorf("listenAddr(%q, %v) = %q, %v; want %q", tc.listen, tc.allowRemote, got, err, tc.want)
		}
	}
}

// TestServeRemoteListen: a non-loopback --listen is refused before
// anything is opened, unless --allow-remote, which warns.
func TestServeRemoteListen(t *testing.T) {
	serveNeed(t, "nbdinfo")
	raw := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(raw, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if code := run([]string{"serve", "--listen", "0.0.0.0:0", raw}, &out, &errb); code != exitUsage {
		t.Fatalf("serve --listen 0.0.0.0:0: exit %d, want %d (usage); stderr: %s", code, exitUsage, errb.String())
	}
	if !strings.Contains(errb.String(), "--allow-remote") || out.Len() != 0 {
		t.Errorf("refusal does not point to --allow-remote, or served anyway:\nstdout: %s\nstderr: %s", out.String(), errb.String())
	}

	var stderr bytes.Buffer
	cmd, stdout, uri := startServeCmd(t, &stderr, "--listen", "0.0.0.0:0", "--allow-remote", "--read-only", raw)
	// Go reports a listener on 0.0.0.0 as [::] where IPv6 is enabled.
	hostPort, ok := strings.CutSuffix(strings.TrimPrefix(uri, "nbd://"), "/disk.raw")
	host, port, err := net.SplitHostPort(hostPort)
	if !ok || err != nil || !net.ParseIP(host).IsUnspecified() {
		t.Fatalf("URI %q, want one on the unspecified address", uri)
	}
	serveRun(t, "nbdinfo", "--size", "nbd://127.0.0.1:"+port)
	cmd.Process.Signal(syscall.SIGTERM)
	go io.Copy(io.Discard, stdout)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve: %v; stderr: %s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "WARNING: NBD has no authentication") {
		t.Errorf("no warning about the missing authentication; stderr: %s", stderr.String())
	}
}
