package simfs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// The quota tests need writes from a process without CAP_SYS_RESOURCE (root
// bypasses quota). The test binary re-executes itself as such a process: with
// childEnv set, TestMain runs the operations in childOpsEnv and prints one
// childResult per operation as JSON instead of running tests.
const (
	childEnv    = "SIMFS_TEST_CHILD"
	childOpsEnv = "SIMFS_TEST_CHILD_OPS"
)

// childOp is one operation for the child. Dir and Dir2 index the directory
// file descriptors handed to the child (fd 3, 4, ...), so the child needs no
// search permission on the directories above the volumes.
type childOp struct {
	Op    string // write, create, link, rename, create-volume, umount
	Dir   int
	Name  string
	Dir2  int
	Name2 string
	Bytes int64 // write: how many bytes to append
	Count int   // create: how many empty files Name0, Name1, ...
	// create-volume (run as root in a fresh process): Open(Root) then
	// Create(Name, Bytes, Count) with FirstProjectID First.
	Root  string
	First uint32
}

type childResult struct {
	Errno   string // "" for success, else the errno's name (EDQUOT, EXDEV, ...)
	Err     string
	Written int64
	Created int
	Project uint32
}

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	os.Exit(m.Run())
}

func runChild() int {
	var ops []childOp
	if err := json.Unmarshal([]byte(os.Getenv(childOpsEnv)), &ops); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	results := make([]childResult, len(ops))
	for i, op := range ops {
		results[i] = runChildOp(op)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		return 2
	}
	return 0
}

func runChildOp(op childOp) childResult {
	var res childResult
	fail := func(err error) childResult {
		res.Err = err.Error()
		var errno syscall.Errno
		if errors.As(err, &errno) {
			res.Errno = unix.ErrnoName(errno)
		} else {
			res.Errno = "other"
		}
		return res
	}
	dir, dir2 := 3+op.Dir, 3+op.Dir2
	switch op.Op {
	case "write":
		fd, err := unix.Openat(dir, op.Name, unix.O_WRONLY|unix.O_CREAT|unix.O_APPEND|unix.O_CLOEXEC, 0o644)
		if err != nil {
			return fail(err)
		}
		defer unix.Close(fd)
		buf := make([]byte, 64<<10)
		for i := range buf {
			buf[i] = byte(i*7 + 1)
		}
		for res.Written < op.Bytes {
			n, err := unix.Write(fd, buf[:min(int64(len(buf)), op.Bytes-res.Written)])
			res.Written += int64(max(n, 0))
			if err != nil {
				return fail(err)
			}
		}
		if err := unix.Fsync(fd); err != nil {
			return fail(err)
		}
	case "create":
		for ; res.Created < op.Count; res.Created++ {
			fd, err := unix.Openat(dir, fmt.Sprintf("%s%d", op.Name, res.Created), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
			if err != nil {
				return fail(err)
			}
			unix.Close(fd)
		}
	case "link":
		if err := unix.Linkat(dir, op.Name, dir2, op.Name2, 0); err != nil {
			return fail(err)
		}
	case "rename":
		if err := unix.Renameat(dir, op.Name, dir2, op.Name2); err != nil {
			return fail(err)
		}
	case "umount": // in a child started in its own mount namespace
		if err := unix.Unmount(op.Root, 0); err != nil {
			return fail(err)
		}
	case "create-volume":
		r, err := Open(op.Root, Options{FirstProjectID: op.First})
		if err != nil {
			return fail(err)
		}
		defer r.Close()
		v, err := r.Create(op.Name, uint64(op.Bytes), uint64(op.Count))
		if err != nil {
			return fail(err)
		}
		res.Project = v.Project
	default:
		return fail(fmt.Errorf("unknown op %q", op.Op))
	}
	return res
}

// childBinary is a copy of the test binary that any user may execute (the
// original may sit in a directory only root can search).
type childBinary struct {
	once sync.Once
	path string
	err  error
}

func (c *childBinary) get(t *testing.T) string {
	t.Helper()
	c.once.Do(func() {
		dir, err := os.MkdirTemp("", "simfs-child-")
		if err != nil {
			c.err = err
			return
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			c.err = err
			return
		}
		src, err := os.Open(os.Args[0])
		if err != nil {
			c.err = err
			return
		}
		defer src.Close()
		c.path = filepath.Join(dir, "simfs.test")
		dst, err := os.OpenFile(c.path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
		if err != nil {
			c.err = err
			return
		}
		if _, err := io.Copy(dst, src); err != nil {
			c.err = err
		}
		if err := dst.Close(); err != nil && c.err == nil {
			c.err = err
		}
	})
	if c.err != nil {
		t.Fatalf("copy test binary for child processes: %v", c.err)
	}
	return c.path
}

// runChild runs ops in a child process with the given directories open as
// fd 3, 4, ...; cred nil runs it as root.
func runChildOps(t *testing.T, bin string, cred *syscall.Credential, dirs []string, ops ...childOp) []childResult {
	t.Helper()
	var files []*os.File
	for _, d := range dirs {
		f, err := os.OpenFile(d, os.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	cmd := childCommand(t, bin, cred, files, ops)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child %v: %v", ops, err)
	}
	return decodeChildOutput(t, out, len(ops))
}

func childCommand(t *testing.T, bin string, cred *syscall.Credential, files []*os.File, ops []childOp) *exec.Cmd {
	t.Helper()
	enc, err := json.Marshal(ops)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), childEnv+"=1", childOpsEnv+"="+string(enc))
	cmd.ExtraFiles = files
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	cmd.Stderr = &testLogWriter{t}
	return cmd
}

func decodeChildOutput(t *testing.T, out []byte, n int) []childResult {
	t.Helper()
	var results []childResult
	if err := json.Unmarshal(out, &results); err != nil || len(results) != n {
		t.Fatalf("child output %q: %v", out, err)
	}
	return results
}

// runChildrenAtOnce runs one root child process per ops list, all at the same
// time, and returns their results in order.
func runChildrenAtOnce(t *testing.T, bin string, opsLists ...[]childOp) [][]childResult {
	t.Helper()
	cmds := make([]*exec.Cmd, len(opsLists))
	outs := make([]*bytes.Buffer, len(opsLists))
	for i, ops := range opsLists {
		cmds[i] = childCommand(t, bin, nil, nil, ops)
		outs[i] = &bytes.Buffer{}
		cmds[i].Stdout = outs[i]
	}
	for i, c := range cmds {
		if err := c.Start(); err != nil {
			t.Fatalf("start child %d: %v", i, err)
		}
	}
	results := make([][]childResult, len(cmds))
	for i, c := range cmds {
		if err := c.Wait(); err != nil {
			t.Fatalf("child %d: %v", i, err)
		}
		results[i] = decodeChildOutput(t, outs[i].Bytes(), len(opsLists[i]))
	}
	return results
}

type testLogWriter struct{ t *testing.T }

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.t.Logf("child: %s", p)
	return len(p), nil
}

// TestChildProtocol exercises the child re-exec on the host (as root, no
// quota), so the VM tests' helper is known to work before a VM is booted.
func TestChildProtocol(t *testing.T) {
	var cb childBinary
	dir := t.TempDir()
	other := t.TempDir()
	res := runChildOps(t, cb.get(t), nil, []string{dir, other},
		childOp{Op: "write", Dir: 0, Name: "f", Bytes: 100 << 10},
		childOp{Op: "create", Dir: 0, Name: "n", Count: 3},
		childOp{Op: "link", Dir: 0, Name: "f", Dir2: 1, Name2: "g"},
		childOp{Op: "rename", Dir: 0, Name: "missing", Dir2: 1, Name2: "h"},
		childOp{Op: "bogus"},
	)
	if res[0].Errno != "" || res[0].Written != 100<<10 {
		t.Errorf("write: %+v", res[0])
	}
	if res[1].Errno != "" || res[1].Created != 3 {
		t.Errorf("create: %+v", res[1])
	}
	if res[2].Errno != "" {
		t.Errorf("link: %+v", res[2])
	}
	if res[3].Errno != "ENOENT" {
		t.Errorf("rename of a missing file: %+v, want ENOENT", res[3])
	}
	if res[4].Errno != "other" {
		t.Errorf("bogus op: %+v", res[4])
	}
	fi, err := os.Stat(filepath.Join(other, "g"))
	if err != nil || fi.Size() != 100<<10 {
		t.Fatalf("linked file: %v, %v", fi, err)
	}
}
