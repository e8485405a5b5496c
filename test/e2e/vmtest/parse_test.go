package vmtest

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

const testNonce = "0123456789abcdef"

func TestParseConsoleLine(t *testing.T) {
	out := func(s string) consoleLine { return consoleLine{Event: eventOutput, Text: s} }
	tests := []struct {
		name string
		line string
		want []consoleLine
	}{
		{"plain", "hello", []consoleLine{out("hello")}},
		{"crlf", "hello\r", []consoleLine{out("hello")}},
		{"clear screen kept after escape", "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)", []consoleLine{out("\x1b[0mSeaBIOS (version 1.16)")}},
		{"start", "<<vmtest:" + testNonce + ":start>>\r", []consoleLine{{Event: eventStart}}},
		{"exit", "<<vmtest:" + testNonce + ":exit=42>>", []consoleLine{{Event: eventExit, Status: 42}}},
		{"exit after unterminated output", "partial<<vmtest:" + testNonce + ":exit=0>>", []consoleLine{out("partial"), {Event: eventExit}}},
		{"initfail", "<<vmtest:" + testNonce + ":initfail=mount host root over 9p>>", []consoleLine{{Event: eventInitFail, Text: "mount host root over 9p"}}},
		{"other nonce is output", "<<vmtest:ffffffffffffffff:exit=1>>", []consoleLine{out("<<vmtest:ffffffffffffffff:exit=1>>")}},
		{"bad status is output", "<<vmtest:" + testNonce + ":exit=300>>", []consoleLine{out("<<vmtest:" + testNonce + ":exit=300>>")}},
		{"unknown marker is output", "<<vmtest:" + testNonce + ":reboot>>", []consoleLine{out("<<vmtest:" + testNonce + ":reboot>>")}},
		{"truncated marker", "<<vmtest:" + testNonce + ":>", []consoleLine{out("<<vmtest:" + testNonce + ":>")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseConsoleLine(testNonce, tt.line)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("parseConsoleLine(%q) = %+v, want %+v", tt.line, got, tt.want)
			}
		})
	}
}

func FuzzParseConsoleLine(f *testing.F) {
	f.Add("<<vmtest:" + testNonce + ":exit=3>>")
	f.Add("x<<vmtest:" + testNonce + ":start>>")
	f.Add("<<vmtest:" + testNonce + ":initfail=why>>\r")
	f.Add("\x1b[2J<<vmtest:" + testNonce + ":>>")
	f.Fuzz(func(t *testing.T, line string) {
		evs := parseConsoleLine(testNonce, line)
		if len(evs) == 0 || len(evs) > 2 {
			t.Fatalf("%d events for %q", len(evs), line)
		}
		for _, ev := range evs {
			if ev.Event == eventExit && (ev.Status < 0 || ev.Status > 255) {
				t.Fatalf("exit status %d out of range", ev.Status)
			}
			if ev.Event != eventOutput && !strings.Contains(strings.ReplaceAll(line, "\r", ""), markerPrefix(testNonce)) {
				t.Fatalf("marker event %v without a marker in %q", ev.Event, line)
			}
		}
	})
}

func TestReadConsole(t *testing.T) {
	console := "\x1bc\x1b[2JSeaBIOS\r\nboot noise\r\n" +
		"<<vmtest:" + testNonce + ":start>>\r\n" +
		"line 1\r\n\r\nline 3\r\n" + // an empty line inside the output is kept
		"\r\n<<vmtest:" + testNonce + ":exit=7>>\r\n" + // the init's separator is not
		"reboot: Power down\r\n"
	var out bytes.Buffer
	st := readConsole(strings.NewReader(console), testNonce, &out, nil, time.Now())
	if !st.started || !st.exited || st.status != 7 {
		t.Fatalf("state %+v, want started, exited with 7", st)
	}
	if got, want := out.String(), "line 1\n\nline 3\n"; got != want {
		t.Errorf("output %q, want %q", got, want)
	}
	if got := strings.Join(st.noise.lines(), "|"); got != "SeaBIOS|boot noise|reboot: Power down" {
		t.Errorf("noise %q", got)
	}
}

func TestParseAptDepends(t *testing.T) {
	tests := []struct {
		name, out, want string
		wantErr         bool
	}{
		{"debian", "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n", "linux-image-6.1.0-56-amd64", false},
		{"alternative", "linux-image-amd64\n |Depends: linux-image-6.1.0-9-amd64\n", "linux-image-6.1.0-9-amd64", false},
		{"virtual skipped", "x\n  Depends: <linux-image-x>\n  Depends: linux-image-6.1.0-1-amd64\n", "linux-image-6.1.0-1-amd64", false},
		{"none", "linux-image-amd64\n  Recommends: firmware\n", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseAptDepends([]byte(tt.out), "linux-image-")
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("got %q, %v; want %q, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func FuzzParseAptDepends(f *testing.F) {
	f.Add("linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n")
	f.Add(" |Depends: linux-image-x y\n")
	f.Fuzz(func(t *testing.T, out string) {
		got, err := parseAptDepends([]byte(out), "linux-image-")
		if err == nil && (!strings.HasPrefix(got, "linux-image-") || strings.ContainsAny(got, " /<>")) {
			t.Fatalf("unsafe package name %q", got)
		}
	})
}

func TestParseShowDepends(t *testing.T) {
	out := "insmod /r/lib/modules/6.1/kernel/lib/crc16.ko \ninsmod /r/lib/modules/6.1/kernel/fs/ext4/ext4.ko \nbuiltin crc32c\n"
	got, err := parseShowDepends([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/r/lib/modules/6.1/kernel/lib/crc16.ko", "/r/lib/modules/6.1/kernel/fs/ext4/ext4.ko"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	if _, err := parseShowDepends([]byte("insmod relative.ko\n")); err == nil {
		t.Error("relative module path accepted")
	}
}

func FuzzParseShowDepends(f *testing.F) {
	f.Add("insmod /a/b.ko nbds_max=16\nbuiltin x\n")
	f.Fuzz(func(t *testing.T, out string) {
		paths, err := parseShowDepends([]byte(out))
		for _, p := range paths {
			if err == nil && !filepath.IsAbs(p) {
				t.Fatalf("relative path %q", p)
			}
		}
	})
}

// TestCPIOWriter checks the archive with the real cpio tool.
func TestCPIOWriter(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Fatalf("cpio not installed (see .ci/deps): %v", err)
	}
	var buf bytes.Buffer
	w := newCPIOWriter(&buf)
	w.Dir("bin")
	w.File("bin/hello", 0o755, []byte("hi\n"))
	w.File("odd", 0o644, []byte("12345"))
	w.Symlink("bin/sh", "hello")
	w.CharDev("console", 5, 1)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-t", "-v", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -t: %v\n%s", err, out)
	}
	for _, want := range []string{"drwxr-xr-x", "bin/hello", "odd", "bin/sh -> hello", "crw-------", "5,"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("cpio listing lacks %q:\n%s", want, out)
		}
	}
	dir := t.TempDir()
	cmd = exec.Command("cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "bin/hello", "odd")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v\n%s", err, out)
	}
	for name, want := range map[string]string{"bin/hello": "hi\n", "odd": "12345"} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || string(got) != want {
			t.Errorf("%s = %q, %v; want %q", name, got, err, want)
		}
	}
}

func TestGuestRunPattern(t *testing.T) {
	tests := []struct{ name, hostRun, want string }{
		{"TestKernel", "", `^TestKernel$`},
		{"TestKernel", "TestKernel", `^TestKernel$`},
		{"TestKernel", "TestKernel/Resize", `^TestKernel$/Resize`},
		{"TestKernel/a+b", "", `^TestKernel$/^a\+b$`},
		{"TestKernel/a", "TestKernel/b", `^TestKernel$/^a$`},
	}
	for _, tt := range tests {
		if got := guestRunPattern(tt.name, tt.hostRun); got != tt.want {
			t.Errorf("guestRunPattern(%q, %q) = %q, want %q", tt.name, tt.hostRun, got, tt.want)
		}
	}
}

func TestCheckGuestPath(t *testing.T) {
	for _, p := range []string{"/tmp/TestX123/001", "/work/main/pkg/nbd"} {
		if _, err := checkGuestPath("dir", p); err != nil {
			t.Errorf("%q rejected: %v", p, err)
		}
	}
	for _, p := range []string{"/tmp/a b", "/tmp/$x", "/tmp/\"q", "/tmp/a\nb"} {
		if _, err := checkGuestPath("dir", p); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
}

func TestResolveOptions(t *testing.T) {
	t.Setenv("PLOOP_CSI_VM_MEM", "3072")
	t.Setenv("PLOOP_CSI_VM_CPUS", "1")
	t.Setenv("PLOOP_CSI_VM_ACCEL", "tcg")
	c, err := resolveOptions(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if c.MemoryMiB != 3072 || c.CPUs != 1 || c.Accel != "tcg" || c.Timeout != 10*time.Minute {
		t.Errorf("env not applied: %+v", c)
	}
	c, err = resolveOptions(Options{MemoryMiB: 1024, CPUs: 2})
	if err != nil || c.MemoryMiB != 1024 || c.CPUs != 2 {
		t.Errorf("explicit options lost: %+v, %v", c, err)
	}
	t.Setenv("PLOOP_CSI_VM_ACCEL", "hvf")
	if _, err := resolveOptions(Options{}); err == nil || !strings.Contains(err.Error(), "unknown accelerator") {
		t.Errorf("bad accelerator: %v", err)
	}
	t.Setenv("PLOOP_CSI_VM_ACCEL", "")
	t.Setenv("PLOOP_CSI_VM_MEM", "lots")
	if _, err := resolveOptions(Options{}); err == nil || !strings.Contains(err.Error(), "PLOOP_CSI_VM_MEM") {
		t.Errorf("bad memory: %v", err)
	}
}

func TestGuestEnvForwardsCIAndProjectVars(t *testing.T) {
	t.Setenv("CI", "true")
	t.Setenv("PLOOP_CSI_SOMETHING", "x y")
	t.Setenv("UNRELATED_VAR", "1")
	env := strings.Join(guestEnv([]string{"EXTRA=1"}, "/tmp/x"), "\n")
	for _, want := range []string{"CI=true", "PLOOP_CSI_SOMETHING=x y", "EXTRA=1", "HOME=/root", "TMPDIR=/tmp", "PLOOP_CSI_VM_EXCHANGE_DIR=/tmp/x"} {
		if !strings.Contains(env, want+"\n") && !strings.HasSuffix(env, want) {
			t.Errorf("guest env lacks %q:\n%s", want, env)
		}
	}
	if strings.Contains(env, "UNRELATED_VAR") {
		t.Errorf("guest env has an unrelated host variable:\n%s", env)
	}
}

func TestShellQuote(t *testing.T) {
	for _, s := range []string{"plain", "it's", `a "b" $c`, "", "x\ny"} {
		out, err := exec.Command("sh", "-c", "printf %s "+shellQuote(s)).Output()
		if err != nil || string(out) != s {
			t.Errorf("shellQuote(%q) round trip = %q, %v", s, out, err)
		}
	}
}

func TestHiddenHostDir(t *testing.T) {
	tests := []struct{ dir, want string }{
		{"/work/main/pkg/nbd", ""},
		{"/tmp/clean/pkg/nbd", "/tmp/clean"},
		{"/tmp/clean", "/tmp/clean"},
		{"/var/tmp/x/y", "/var/tmp/x"},
		{"/run/user/0/co", "/run/user"},
		{"/tmp", ""},
		{"/tmp/TestX1/001/sub", ""}, // the exchange dir is shared anyway
	}
	for _, tt := range tests {
		if got := hiddenHostDir(tt.dir, "/tmp/TestX1/001"); got != tt.want {
			t.Errorf("hiddenHostDir(%q) = %q, want %q", tt.dir, got, tt.want)
		}
	}
}

// fakeBzImage builds the header fields bzImagePayload reads.
func fakeBzImage(setupSects byte, payloadOff uint32, payload []byte) []byte {
	sects := int(setupSects)
	if sects == 0 {
		sects = 4
	}
	img := make([]byte, (sects+1)*512+int(payloadOff))
	img[0x1f1] = setupSects
	copy(img[0x202:], "HdrS")
	binary.LittleEndian.PutUint32(img[0x248:], payloadOff)
	binary.LittleEndian.PutUint32(img[0x24c:], uint32(len(payload)))
	return append(img, payload...)
}

func TestBzImagePayload(t *testing.T) {
	payload := []byte("\xfd7zXZ\x00compressed")
	got, err := bzImagePayload(fakeBzImage(3, 100, payload))
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("got %q, %v; want %q", got, err, payload)
	}
	bad := fakeBzImage(3, 100, payload)
	binary.LittleEndian.PutUint32(bad[0x24c:], 1<<30)
	if _, err := bzImagePayload(bad); err == nil {
		t.Error("payload past the end accepted")
	}
	if _, err := bzImagePayload([]byte("MZ not a kernel")); err == nil {
		t.Error("non-bzImage accepted")
	}
}

func FuzzBzImagePayload(f *testing.F) {
	f.Add(fakeBzImage(3, 100, []byte("\xfd7zXZ\x00x")))
	f.Add(fakeBzImage(0, 0, []byte{0x1f, 0x8b}))
	f.Fuzz(func(t *testing.T, img []byte) {
		p, err := bzImagePayload(img)
		if err == nil && len(p) == 0 {
			t.Fatal("empty payload without error")
		}
	})
}

// TestCheckPVHNote uses the host's real kernel tools: a Go-built ELF has no
// PVH note and must be refused; the ELF parser must not panic on junk.
func TestCheckPVHNote(t *testing.T) {
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	if err := checkPVHNote(self); err == nil || !strings.Contains(err.Error(), "no PVH entry note") {
		t.Errorf("test binary: got %v, want no PVH entry note", err)
	}
	if err := checkPVHNote([]byte("junk")); err == nil {
		t.Error("junk accepted")
	}
}

func FuzzCheckPVHNote(f *testing.F) {
	f.Add([]byte("\x7fELF\x02\x01\x01"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = checkPVHNote(b) // must not panic
	})
}

func TestSkipReason(t *testing.T) {
	tests := []struct {
		skip, ci string
		skipped  bool
	}{
		{"", "", false},
		{"1", "", true},
		{"1", "false", true},
		{"1", "true", false}, // CI never skips
		{"0", "", false},
	}
	for _, tt := range tests {
		t.Setenv("PLOOP_CSI_SKIP_VM", tt.skip)
		t.Setenv("CI", tt.ci)
		if got := SkipReason() != ""; got != tt.skipped {
			t.Errorf("PLOOP_CSI_SKIP_VM=%q CI=%q: skipped %v, want %v", tt.skip, tt.ci, got, tt.skipped)
		}
	}
}

// TestGuestFailures: the host's failure message names the innermost guest
// tests that failed, each with its last lines, from go test -v output.
func TestGuestFailures(t *testing.T) {
	tests := []struct {
		name, output string
		want         []string // substrings of failures(), in order
		none         bool
	}{
		{
			name:   "all passed",
			output: "=== RUN   TestK\n=== RUN   TestK/A\n    a_test.go:1: fine\n--- PASS: TestK (1.00s)\n    --- PASS: TestK/A (1.00s)\nPASS\n",
			none:   true,
		},
		{
			name: "innermost failure with its last lines",
			output: "=== RUN   TestK\n=== RUN   TestK/A\n    a_test.go:1: one\n    a_test.go:2: two\n=== RUN   TestK/B\n    b_test.go:1: fine\n" +
				"=== NAME  TestK/A\n    a_test.go:3: three\n    a_test.go:4: four\n    a_test.go:5: five\n    a_test.go:6: boom\n" +
				"--- FAIL: TestK (2.00s)\n    --- FAIL: TestK/A (1.00s)\n    --- PASS: TestK/B (1.00s)\nFAIL\n",
			want: []string{"guest TestK/A failed", "a_test.go:3: three", "a_test.go:6: boom"},
		},
		{
			name:   "unterminated last line counts",
			output: "=== RUN   TestK\n    k_test.go:9: died\n--- FAIL: TestK (0.10s)\n    k_test.go:10: tail",
			want:   []string{"guest TestK failed", "k_test.go:9: died"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logged []string
			w := newTestLogWriter(func(args ...any) { logged = append(logged, args[0].(string)) })
			for _, chunk := range strings.SplitAfter(tt.output, "\n") {
				w.Write([]byte(chunk))
			}
			w.flush()
			if n := strings.Count(tt.output, "\n") + 1; strings.HasSuffix(tt.output, "\n") && len(logged) != n-1 || !strings.HasSuffix(tt.output, "\n") && len(logged) != n {
				t.Errorf("logged %d lines for %d", len(logged), n)
			}
			got := w.failures()
			if tt.none {
				if got != "" {
					t.Errorf("failures() = %q, want none", got)
				}
				return
			}
			if strings.Contains(got, "guest TestK failed") && strings.Contains(got, "TestK/") {
				t.Errorf("failures() names the parent as well as a subtest: %q", got)
			}
			if strings.Contains(got, "a_test.go:2: two") {
				t.Errorf("failures() = %q, want only the last %d lines", got, failureLines)
			}
			at := 0
			for _, w := range tt.want {
				i := strings.Index(got[at:], w)
				if i < 0 {
					t.Fatalf("failures() = %q, want %q after byte %d", got, w, at)
				}
				at += i + len(w)
			}
		})
	}
}

// FuzzGuestFailures: any guest output is logged line for line, and what
// failures() reports names only tests that printed a --- FAIL line.
func FuzzGuestFailures(f *testing.F) {
	f.Add("=== RUN   TestK\n=== RUN   TestK/A\n    a_test.go:1: boom\n--- FAIL: TestK (0.00s)\n    --- FAIL: TestK/A (0.00s)\nFAIL\n")
	f.Add("=== NAME  \n--- FAIL: \n--- FAIL: x/\x00\n")
	f.Fuzz(func(t *testing.T, out string) {
		lines := 0
		w := newTestLogWriter(func(...any) { lines++ })
		w.Write([]byte(out))
		w.flush()
		if want := strings.Count(out, "\n"); lines < want {
			t.Fatalf("logged %d lines of %d", lines, want)
		}
		for _, l := range strings.Split(w.failures(), "\n\tguest ")[1:] {
			name, _, _ := strings.Cut(l, " failed")
			if !strings.Contains(out, "--- FAIL: "+name) {
				t.Fatalf("failures() names %q, which never failed", name)
			}
		}
	})
}
