package cachedbin

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

func TestGet(t *testing.T) {
	var builds atomic.Int32
	script := func(ctx context.Context, work, out string) error {
		builds.Add(1)
		return os.WriteFile(out, []byte("#!/bin/sh\n"), 0o755)
	}
	failing := func(ctx context.Context, work, out string) error {
		builds.Add(1)
		// Half an executable, as a killed or failed build leaves.
		os.WriteFile(out, []byte("#!"), 0o755)
		return errors.New("compile error")
	}
	noOutput := func(ctx context.Context, work, out string) error {
		builds.Add(1)
		return nil
	}
	cases := []struct {
		name       string
		build      BuildFunc
		calls      int
		wantBuilds int32
		wantErr    bool
	}{
		{"built once, then found", script, 3, 1, false},
		{"a failed build leaves nothing, and is tried again", failing, 2, 2, true},
		{"a build that writes nothing fails", noOutput, 1, 1, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv("PLOOP_CSI_CACHE", t.TempDir())
			builds.Store(0)
			for range c.calls {
				p, err := Get(context.Background(), "tool", "v1.0.0", "tool", c.build, t.Logf)
				if (err != nil) != c.wantErr {
					t.Fatalf("Get: %v, want an error: %v", err, c.wantErr)
				}
				if err == nil && p != filepath.Join(Dir(), "tool", "v1.0.0", "tool") {
					t.Errorf("Get = %s", p)
				}
			}
			if got := builds.Load(); got != c.wantBuilds {
				t.Errorf("%d builds, want %d", got, c.wantBuilds)
			}
			if c.wantErr {
				if _, err := os.Stat(filepath.Join(Dir(), "tool", "v1.0.0", "tool")); !os.IsNotExist(err) {
					t.Errorf("a failed build left the executable: %v", err)
				}
				if left, _ := filepath.Glob(filepath.Join(Dir(), "tool", "v1.0.0", ".build-*")); len(left) != 0 {
					t.Errorf("a failed build left %v", left)
				}
			}
		})
	}
}

// TestGetConcurrent: callers racing for a missing tool build it once.
func TestGetConcurrent(t *testing.T) {
	t.Setenv("PLOOP_CSI_CACHE", t.TempDir())
	var builds atomic.Int32
	build := func(ctx context.Context, work, out string) error {
		builds.Add(1)
		return os.WriteFile(out, []byte("#!/bin/sh\n"), 0o755)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if _, err := Get(context.Background(), "tool", "v1", "tool", build, t.Logf); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got := builds.Load(); got != 1 {
		t.Errorf("%d builds, want 1", got)
	}
}
