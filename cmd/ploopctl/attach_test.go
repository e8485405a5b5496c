package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestAttachKernel runs `ploopctl attach` and `ploopctl detach` against the
// real nbd driver in the VM; the ploopctl binary is built on the host into
// the exchange directory.
func TestAttachKernel(t *testing.T) {
	vmtest.Run(t, vmtest.Options{
		Timeout: 20 * time.Minute,
		Prepare: func(xchg string) error {
			out, err := exec.Command("go", "build", "-o", filepath.Join(xchg, "ploopctl"), ".").CombinedOutput()
			if err != nil {
				return &buildError{err, out}
			}
			return nil
		},
	}, []vmtest.Case{
		{Name: "AttachMountDetach", Run: testAttachMountDetach},
		{Name: "DetachWithoutServer", Run: testDetachWithoutServer},
		{Name: "StackOnline", Run: testAttachStackOnline},
		{Name: "StackReattachAfterKill", Run: testStackReattachAfterKill},
	})
}

type buildError struct {
	err error
	out []byte
}

func (e *buildError) Error() string {
	return "go build ploopctl: " + e.err.Error() + "\n" + string(e.out)
}

func guestPloopctl() string { return filepath.Join(vmtest.ExchangeDir(), "ploopctl") }

func guestMust(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// startAttach runs `ploopctl attach args...` and returns the device it
// prints and the running command.
func startAttach(t *testing.T, args ...string) (string, *exec.Cmd, *bytes.Buffer) {
	t.Helper()
	stderr := &bytes.Buffer{}
	cmd, out := startCmd(t, stderr, guestPloopctl(), append([]string{"attach"}, args...)...)
	lines := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		lines <- l
		io.Copy(io.Discard, out)
	}()
	select {
	case l := <-lines:
		if !strings.HasPrefix(l, "/dev/nbd") {
			cmd.Wait()
			t.Fatalf("ploopctl attach printed %q; stderr: %s", l, stderr)
		}
		return strings.TrimSpace(l), cmd, stderr
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("ploopctl attach printed nothing in a minute; stderr: %s", stderr)
	}
	return "", nil, nil
}

func testAttachMountDetach(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "vol.hds")
	guestMust(t, "qemu-img", "create", "-q", "-f", "parallels", img, "256M")
	// Put a filesystem on it through a first attach.
	dev, cmd, stderr := startAttach(t, "--connections", "2", img)
	guestMust(t, "mkfs.ext4", "-q", dev)
	guestMust(t, guestPloopctl(), "detach", dev)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("attach exited with %v after detach; stderr: %s", err, stderr)
	}

	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	dev, cmd, stderr = startAttach(t, "--mount", mnt, img)
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/backend"); err != nil || strings.TrimSpace(string(b)) != img {
		t.Errorf("backend of %s = %q, %v; want %s", dev, b, err, img)
	}
	data := bytes.Repeat([]byte("ploop"), 200000)
	if err := os.WriteFile(filepath.Join(mnt, "file"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	guestMust(t, guestPloopctl(), "detach", dev)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("attach exited with %v after detach; stderr: %s", err, stderr)
	}
	if mounted(t, mnt) {
		t.Fatalf("%s still mounted after detach", mnt)
	}
	k, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	idx, _ := nbd.ParseDevice(dev)
	if ok, err := k.Status(idx); err != nil || ok {
		t.Fatalf("%s connected=%v (%v) after detach", dev, ok, err)
	}
	guestMust(t, "qemu-img", "check", "-f", "parallels", img)

	// The data survived: attach read-only and compare.
	dev, cmd, stderr = startAttach(t, "--read-only", "--mount", mnt, img)
	got, err := os.ReadFile(filepath.Join(mnt, "file"))
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("file after re-attach: %d bytes, %v", len(got), err)
	}
	guestMust(t, guestPloopctl(), "detach", dev)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("read-only attach exited with %v; stderr: %s", err, stderr)
	}
}

// A device whose attach process died is still connected (its I/O held);
// detach then disconnects it through netlink.
func testDetachWithoutServer(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "orphan.hds")
	guestMust(t, "qemu-img", "create", "-q", "-f", "parallels", img, "256M")
	dev, cmd, _ := startAttach(t, img)
	cmd.Process.Kill()
	cmd.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, guestPloopctl(), "detach", dev).CombinedOutput()
	if err != nil {
		t.Fatalf("detach of an orphaned device: %v\n%s", err, out)
	}
	k, err := nbd.OpenKernel()
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	idx, _ := nbd.ParseDevice(dev)
	if ok, err := k.Status(idx); err != nil || ok {
		t.Fatalf("%s connected=%v (%v) after detach", dev, ok, err)
	}
}

func mounted(t *testing.T, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}
