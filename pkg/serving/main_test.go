package serving

// Some tests need a second process: a control client running as another
// user, or a server that is SIGKILLed. They re-execute this test binary
// with childEnv set; TestMain then runs childMain instead of the tests.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

const childEnv = "PLOOP_CSI_SERVING_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(childMain(mode))
	}
	os.Exit(m.Run())
}

// childResult is what a "call" child prints.
type childResult struct {
	Reply Reply  `json:"reply"`
	Err   string `json:"err,omitempty"`
}

// childMain is the second process. "call" sends one control request and
// prints a childResult; "hold" opens a volume for writing, writes one
// cluster of 0x5a at offset 0, prints "ready" and waits to be killed.
func childMain(mode string) int {
	switch mode {
	case "call":
		var req Request
		if err := json.Unmarshal([]byte(os.Getenv("SERVING_REQUEST")), &req); err != nil {
			fmt.Println(err)
			return 2
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		rep, err := Call(ctx, os.Getenv("SERVING_SOCKET"), req)
		res := childResult{Reply: rep}
		if err != nil {
			res.Err = err.Error()
		}
		b, _ := json.Marshal(res)
		fmt.Println(string(b))
		return 0
	case "hold":
		v, err := Open(os.Getenv("SERVING_PATH"), OpenOptions{})
		if err != nil {
			fmt.Println("open:", err)
			return 1
		}
		if _, err := v.disk.WriteAt(pattern(0x5a, 64<<10), 0); err != nil {
			fmt.Println("write:", err)
			return 1
		}
		fmt.Println("ready")
		select {}
	}
	fmt.Println("unknown child mode", mode)
	return 2
}

func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// callAs runs Call in a child process with the given uid and gid.
func callAs(t *testing.T, uid, gid uint32, socket string, req Request) childResult {
	t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	// /proc/self/exe is a magic link: the child reaches the test binary
	// through it even though the build directory is closed to its uid.
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), childEnv+"=call", "SERVING_SOCKET="+socket, "SERVING_REQUEST="+string(b))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("control client as uid %d: %v\n%s", uid, err, out)
	}
	var res childResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("control client as uid %d printed %q: %v", uid, out, err)
	}
	return res
}

// startHolder starts a "hold" child on path and returns it once it has
// the volume open; the caller kills it.
func startHolder(t *testing.T, path string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), childEnv+"=hold", "SERVING_PATH="+path)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	lines := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		lines <- strings.TrimSpace(l)
		io.Copy(io.Discard, out)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	select {
	case l := <-lines:
		if l != "ready" {
			t.Fatalf("holder of %s: %q", path, l)
		}
	case <-ctx.Done():
		t.Fatalf("holder of %s not ready in a minute", path)
	}
	return cmd
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
