// Package gomod fetches modules through the Go module proxy into the module
// cache, for tests that need a module's files (CRDs, a sidecar's source)
// that the project does not depend on.
package gomod

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
)

// Dir downloads module@version (modVersion) and returns its directory in
// the module cache (read-only).
func Dir(ctx context.Context, modVersion string) (string, error) {
	work, err := os.MkdirTemp("", "gomod-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", modVersion)
	cmd.Dir = work // outside any module: only the proxy and the cache matter
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var info struct{ Dir, Error string }
	if jerr := json.Unmarshal(out, &info); err == nil && (jerr != nil || info.Error != "" || info.Dir == "") {
		err = fmt.Errorf("%v %s", jerr, info.Error)
	}
	if err != nil {
		return "", fmt.Errorf("go mod download %s: %w: %s%s", modVersion, err, info.Error, stderr.String())
	}
	return info.Dir, nil
}
