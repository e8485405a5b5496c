package testcmd

import (
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestRunAndStatus(t *testing.T) {
	if got := Run(t, "echo", "hello"); got != "hello\n" {
		t.Fatalf("Run: %q", got)
	}
	if got := Combined(t, "sh", "-c", "echo out; echo err >&2"); got != "out\nerr\n" {
		t.Fatalf("Combined: %q", got)
	}
	for _, tc := range []struct {
		script string
		code   int
	}{{"exit 0", 0}, {"exit 3", 3}, {"echo x; exit 1", 1}} {
		if _, code := Status(t, "sh", "-c", tc.script); code != tc.code {
			t.Errorf("Status(%q) = %d, want %d", tc.script, code, tc.code)
		}
	}
}

func TestWaitFor(t *testing.T) {
	var n atomic.Int32
	WaitFor(t, time.Minute, "three polls", func() (bool, error) { return n.Add(1) == 3, nil })
	if n.Load() != 3 {
		t.Fatalf("polled %d times", n.Load())
	}
}

// TestChild runs this test binary as a child that reports its environment.
func TestChild(t *testing.T) {
	if v := os.Getenv("TESTCMD_CHILD"); v != "" {
		os.Stdout.WriteString("child " + v + "\n")
		return
	}
	out, err := Child("TestChild", "TESTCMD_CHILD=yes").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "child yes\n") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}
