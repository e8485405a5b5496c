// Package cachedbin keeps tools the tests build from source (kube-apiserver,
// helm) in $PLOOP_CSI_CACHE, built once per version and shared by the test
// processes of every package. The cache only saves time: a missing or
// half-built entry is built again, so nothing depends on it existing.
package cachedbin

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Dir is the cache: $PLOOP_CSI_CACHE, else $XDG_CACHE_HOME/ploop-csi, else
// ~/.cache/ploop-csi, else a per-user directory under the temp dir (the
// same choice as the VM harness's).
func Dir() string {
	if d := os.Getenv("PLOOP_CSI_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "ploop-csi")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".cache", "ploop-csi")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("ploop-csi-cache-%d", os.Getuid()))
}

// BuildFunc writes the executable to out; work is a scratch directory of
// its own, removed afterwards.
type BuildFunc func(ctx context.Context, work, out string) error

// Get returns Dir()/tool/version/name, building it with build first when
// it is not there. Builds of one tool serialise on Dir()/tool/.lock, so
// concurrent test processes build it once; other tools are not held up.
// The executable only ever appears by a rename, so a build killed half way
// leaves nothing that looks usable.
func Get(ctx context.Context, tool, version, name string, build BuildFunc, logf func(string, ...any)) (string, error) {
	dir := filepath.Join(Dir(), tool, version)
	bin := filepath.Join(dir, name)
	if isExecutable(bin) {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cache dir: %w", err)
	}
	unlock, err := LockFile(filepath.Join(Dir(), tool, ".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if isExecutable(bin) { // built by another process while we waited
		return bin, nil
	}
	// Builds run only under the lock, so any build dir now is a killed one's.
	if old, err := filepath.Glob(filepath.Join(dir, ".build-*")); err == nil {
		for _, d := range old {
			os.RemoveAll(d)
		}
	}
	work, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return "", fmt.Errorf("create build dir: %w", err)
	}
	defer os.RemoveAll(work)
	logf("cachedbin: building %s %s into %s (minutes on a cold cache)", tool, version, dir)
	start := time.Now()
	tmp := filepath.Join(work, ".out", name)
	if err := os.MkdirAll(filepath.Dir(tmp), 0o755); err != nil {
		return "", err
	}
	if err := build(ctx, work, tmp); err != nil {
		return "", fmt.Errorf("build %s %s: %w", tool, version, err)
	}
	if !isExecutable(tmp) {
		return "", fmt.Errorf("build %s %s: no executable at %s", tool, version, tmp)
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", fmt.Errorf("install %s in cache: %w", tool, err)
	}
	logf("cachedbin: built %s %s in %s", tool, version, time.Since(start).Round(time.Second))
	return bin, nil
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 && st.Size() > 0
}

// LockFile takes an exclusive flock on path (created if missing),
// blocking until other holders, in this process or others, finish; the
// returned func releases it. Cache builders serialise on it.
func LockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open cache lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}
