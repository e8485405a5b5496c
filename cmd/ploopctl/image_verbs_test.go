package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// ploopctlViaTestBinary makes TestRunAsPloopctl act as the real ploopctl
// main, with the arguments after "--", when the test binary re-executes
// itself.
const ploopctlViaTestBinary = "PLOOPCTL_TEST_RUN_MAIN"

func TestRunAsPloopctl(t *testing.T) {
	if os.Getenv(ploopctlViaTestBinary) != "1" {
		return
	}
	for i, a := range os.Args {
		if a == "--" {
			os.Args = append([]string{"ploopctl"}, os.Args[i+1:]...)
			break
		}
	}
	main() // exits
}

// ploopctl runs a verb in-process and returns stdout, stderr and the exit
// status.
func ploopctl(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return out.String(), errOut.String(), code
}

func mustPloopctl(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := ploopctl(t, args...)
	if code != exitOK {
		t.Fatalf("ploopctl %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	testcmd.Need(t, "qemu-img")
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestParseSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4096", 4096, true},
		{"64K", 64 << 10, true},
		{"64k", 64 << 10, true},
		{"512M", 512 << 20, true},
		{"10G", 10 << 30, true},
		{"10GiB", 10 << 30, true},
		{"10GB", 10 << 30, true},
		{"2T", 2 << 40, true},
		{"1P", 1 << 50, true},
		{"0", 0, true},
		{"", 0, false},
		{"G", 0, false},
		{"-1", 0, false},
		{"1.5G", 0, false},
		{"10X", 0, false},
		{"9999999999P", 0, false},
	} {
		got, err := parseSize(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}

func TestHelpAndUsage(t *testing.T) {
	for _, v := range []string{"create", "info", "check", "convert", "map"} {
		out, errOut, code := ploopctl(t, v, "--help")
		if code != exitOK || !strings.Contains(errOut, "usage: ploopctl "+v) || out != "" {
			t.Errorf("%s --help: exit %d, stderr %q", v, code, errOut)
		}
		if _, errOut, code := ploopctl(t, v); code != exitUsage || !strings.Contains(errOut, "ploopctl "+v+":") {
			t.Errorf("%s without arguments: exit %d, stderr %q", v, code, errOut)
		}
		if _, _, code := ploopctl(t, v, "--no-such-flag", "x"); code != exitUsage {
			t.Errorf("%s with a bad flag: exit %d", v, code)
		}
	}
	dir := t.TempDir()
	for _, args := range [][]string{
		{"create", "--size", "10X", filepath.Join(dir, "a")},
		{"create", filepath.Join(dir, "a")},
		{"create", "--size", "1G", "a", "b"},
		{"create", "--size", "1G", "--cluster-size", "3M", filepath.Join(dir, "a")},
		{"convert", "-O", "ploop", "--cluster-size", "16K", "a", "b"},
		{"convert", "-O", "qcow2", "a", "b"},
		{"convert", "--cluster-size", "64K", "a", "b"},
		{"no-such-verb"},
		{"attach", "--timeout", "1500ms", filepath.Join(dir, "a")},
		{"attach", "--dead-conn-timeout", "-1s", filepath.Join(dir, "a")},
		{"attach", "--reattach", "--mount", dir, filepath.Join(dir, "a")},
		{"attach", "--device", "/dev/sda", filepath.Join(dir, "a")},
	} {
		if _, errOut, code := ploopctl(t, args...); code != exitUsage {
			t.Errorf("%v: exit %d, want %d (%s)", args, code, exitUsage, errOut)
		}
	}
	if _, _, code := ploopctl(t, "--help"); code != exitOK {
		t.Errorf("--help: exit %d", code)
	}
}

func TestCreateInfoCheckMap(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "disk.hdd")
	// Flags after the image work as well as before.
	mustPloopctl(t, "create", p, "--size", "300G", "--cluster-size=1M")
	if _, errOut, code := ploopctl(t, "create", "--size", "1G", p); code != exitFail || !strings.Contains(errOut, "exists") {
		t.Fatalf("create over an existing image: exit %d %s", code, errOut)
	}
	out := mustPloopctl(t, "info", p)
	for _, want := range []string{"300 GiB (322122547200 bytes)", "cluster size:       1048576", "ploop v2", "in use:             no", "allocated clusters: 0"} {
		if !strings.Contains(out, want) {
			t.Fatalf("info lacks %q:\n%s", want, out)
		}
	}
	qemuInfo := qemuImg(t, "info", "--output=json", p)
	var qi struct {
		VirtualSize int64 `json:"virtual-size"`
		Format      string
	}
	if err := json.Unmarshal([]byte(qemuInfo), &qi); err != nil || qi.VirtualSize != 300<<30 || qi.Format != "parallels" {
		t.Fatalf("qemu-img info disagrees: %v %s", err, qemuInfo)
	}

	// Write a few clusters, including one above 256 GiB.
	img, err := ploop.Open(p, ploop.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 1 << 20, 5<<20 + 7, 257 << 30} {
		if _, err := img.WriteAt([]byte("data"), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	var info ploop.Info
	if err := json.Unmarshal([]byte(mustPloopctl(t, "info", "--json", p)), &info); err != nil {
		t.Fatal(err)
	}
	if info.AllocatedClusters != 4 || info.AllocatedBytes != 4<<20 || info.VirtualSize != 300<<30 || info.InUse || info.ClusterSize != 1<<20 || info.Version != 2 {
		t.Fatalf("info --json: %+v", info)
	}

	var m []ploop.Mapping
	if err := json.Unmarshal([]byte(mustPloopctl(t, "map", "--json", p)), &m); err != nil {
		t.Fatal(err)
	}
	// qemu-img map lists the same allocated ranges.
	var qm []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal([]byte(qemuImg(t, "map", "--output=json", "-f", "parallels", p)), &qm); err != nil {
		t.Fatal(err)
	}
	var qemuRanges []ploop.Mapping
	for _, r := range qm {
		if r.Data {
			qemuRanges = append(qemuRanges, ploop.Mapping{Offset: r.Start, Length: r.Length})
		}
	}
	if len(m) != len(qemuRanges) {
		t.Fatalf("map %+v, qemu-img map %+v", m, qemuRanges)
	}
	for i := range m {
		if m[i].Offset != qemuRanges[i].Offset || m[i].Length != qemuRanges[i].Length {
			t.Fatalf("map %+v, qemu-img map %+v", m, qemuRanges)
		}
	}
	if out := mustPloopctl(t, "map", p); !strings.Contains(out, "275951648768") {
		t.Fatalf("map text lacks the range at 257 GiB:\n%s", out)
	}

	if out := mustPloopctl(t, "check", p); !strings.Contains(out, "No errors were found") {
		t.Fatalf("check:\n%s", out)
	}
	// Corrupt: set the in-use mark and duplicate an entry.
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	f.WriteAt(binary.LittleEndian.AppendUint32(nil, 0x746F6E59), 44)
	entry0 := make([]byte, 4)
	f.ReadAt(entry0, 64)
	f.WriteAt(entry0, 64+4*9)
	f.Close()
	out, _, code := ploopctl(t, "check", p)
	if code != exitFail || !strings.Contains(out, "ERROR in-use") || !strings.Contains(out, "ERROR duplicate") {
		t.Fatalf("check of a corrupt image: exit %d\n%s", code, out)
	}
	out, _, code = ploopctl(t, "check", "--json", p)
	var rep ploop.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != exitFail || len(rep.Problems) != 2 {
		t.Fatalf("check --json: exit %d %v\n%s", code, err, out)
	}
	if out, _, code := ploopctl(t, "map", p); code != exitOK {
		t.Fatalf("map of a dirty image (read-only) failed: %d %s", code, out)
	}
	out, _, code = ploopctl(t, "check", "--repair", "--json", p)
	if err := json.Unmarshal([]byte(out), &rep); err != nil || code != exitOK || !rep.Repaired || !rep.Clean() {
		t.Fatalf("check --repair --json: exit %d %v\n%s", code, err, out)
	}
	if out := mustPloopctl(t, "check", p); !strings.Contains(out, "No errors were found") {
		t.Fatalf("check after repair:\n%s", out)
	}
	if out := qemuImg(t, "check", "-f", "parallels", p); !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check after repair:\n%s", out)
	}
	// Not an image at all: exit 1 with the reason.
	junk := filepath.Join(dir, "junk")
	os.WriteFile(junk, []byte("hello"), 0o600)
	for _, v := range []string{"info", "check", "map"} {
		if _, errOut, code := ploopctl(t, v, junk); code != exitFail || !strings.Contains(errOut, "not a ploop image") {
			t.Errorf("%s of a non-image: exit %d %q", v, code, errOut)
		}
	}
	if _, errOut, code := ploopctl(t, "info", filepath.Join(dir, "missing")); code != exitFail || !strings.HasPrefix(errOut, "ploopctl info: ") {
		t.Errorf("info of a missing file: exit %d %q", code, errOut)
	}
}

func TestConvert(t *testing.T) {
	dir := t.TempDir()
	const size = 24<<20 + 4096
	rng := rand.New(rand.NewPCG(1, 1))
	src := make([]byte, size)
	for _, r := range [][2]int{{0, 100}, {3 << 20, 2 << 20}, {9<<20 + 5, 70000}, {size - 4096, 4096}} {
		for i := r[0]; i < r[0]+r[1]; i++ {
			src[i] = byte(rng.IntN(255) + 1)
		}
	}
	rawPath := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(rawPath, src, 0o600); err != nil { // zeros written, not holes
		t.Fatal(err)
	}
	for _, cluster := range []string{"64K", "1M", "4M"} {
		t.Run(cluster, func(t *testing.T) {
			hdd := filepath.Join(t.TempDir(), "out.hdd")
			mustPloopctl(t, "convert", "-O", "ploop", "--cluster-size", cluster, rawPath, hdd)
			if out := qemuImg(t, "check", "-f", "parallels", hdd); !strings.Contains(out, "No errors were found") {
				t.Fatalf("qemu-img check:\n%s", out)
			}
			back := filepath.Join(t.TempDir(), "back.raw")
			qemuImg(t, "convert", "-f", "parallels", "-O", "raw", hdd, back)
			got, _ := os.ReadFile(back)
			if !bytes.Equal(got[:size], src) || !isZero(got[size:]) {
				t.Fatal("qemu-img reads the converted image differently")
			}
			// All-zero clusters stay unallocated.
			info, err := ploop.Inspect(hdd)
			if err != nil {
				t.Fatal(err)
			}
			cs := info.ClusterSize
			want := map[int64]bool{}
			for off := int64(0); off < size; off += cs {
				if !isZero(src[off:min(off+cs, size)]) {
					want[off/cs] = true
				}
			}
			if info.AllocatedClusters != int64(len(want)) {
				t.Fatalf("%d clusters allocated, want %d", info.AllocatedClusters, len(want))
			}
			// And back to raw through ploopctl, with the format detected.
			raw2 := filepath.Join(t.TempDir(), "again.raw")
			mustPloopctl(t, "convert", hdd, raw2)
			got, _ = os.ReadFile(raw2)
			if !bytes.Equal(got[:size], src) || !isZero(got[size:]) {
				t.Fatal("ploop -> raw differs")
			}
		})
	}
	// qemu's image converted by us to ploop with another cluster size.
	qemuHdd := filepath.Join(dir, "qemu.hdd")
	qemuImg(t, "convert", "-f", "raw", "-O", "parallels", rawPath, qemuHdd)
	small := filepath.Join(dir, "small.hdd")
	mustPloopctl(t, "convert", "-f", "ploop", "-O", "ploop", "--cluster-size", "32K", qemuHdd, small)
	if out := qemuImg(t, "compare", "-f", "parallels", "-F", "raw", small, rawPath); !strings.Contains(out, "identical") {
		t.Fatalf("qemu-img compare: %s", out)
	}
	// The raw output is sparse where the source was zero.
	sparse := filepath.Join(dir, "sparse.raw")
	mustPloopctl(t, "convert", "-f", "raw", rawPath, sparse)
	var st1, st2 os.FileInfo
	st1, _ = os.Stat(rawPath)
	st2, _ = os.Stat(sparse)
	if blocks(st2) >= blocks(st1)/2 {
		t.Fatalf("raw -> raw is not sparse: %d vs %d blocks", blocks(st2), blocks(st1))
	}
	if _, errOut, code := ploopctl(t, "convert", rawPath, sparse); code != exitFail || !strings.Contains(errOut, "exists") {
		t.Fatalf("convert onto an existing file: exit %d %q", code, errOut)
	}
	if _, errOut, code := ploopctl(t, "convert", "-f", "ploop", rawPath, filepath.Join(dir, "x")); code != exitFail || !strings.Contains(errOut, "not a ploop image") {
		t.Fatalf("convert -f ploop of a raw file: exit %d %q", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); !os.IsNotExist(err) {
		t.Fatal("failed convert left its output behind")
	}
}

func blocks(fi os.FileInfo) int64 {
	return fi.Sys().(*syscall.Stat_t).Blocks
}

// TestBinaryExitCodes runs the real main (the test binary re-executed as
// ploopctl) to check exit statuses end to end.
func TestBinaryExitCodes(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "d.hdd")
	for _, c := range []struct {
		args []string
		code int
	}{
		{[]string{}, exitUsage},
		{[]string{"--help"}, exitOK},
		{[]string{"create", "--size", "64M", p}, exitOK},
		{[]string{"create", "--size", "64M", p}, exitFail},
		{[]string{"create", "--size", "bad", p}, exitUsage},
		{[]string{"check", p}, exitOK},
		{[]string{"check", "--help"}, exitOK},
		{[]string{"info", filepath.Join(dir, "none")}, exitFail},
	} {
		cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestRunAsPloopctl$", "--"}, c.args...)...)
		cmd.Env = append(os.Environ(), ploopctlViaTestBinary+"=1")
		out, _ := cmd.CombinedOutput()
		if got := cmd.ProcessState.ExitCode(); got != c.code {
			t.Errorf("ploopctl %v: exit %d, want %d\n%s", c.args, got, c.code, out)
		}
	}
}

// FuzzParseSize: parseSize never panics, never returns a negative size,
// and agrees with itself on the number it prints back.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"4096", "64K", "512M", "10G", "10GiB", "1P", "", "G", "-1", "99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
		back, err := parseSize(strconv.FormatInt(n, 10))
		if err != nil || back != n {
			t.Fatalf("parseSize(%q) = %d, but %d parses as %d, %v", s, n, n, back, err)
		}
	})
}
