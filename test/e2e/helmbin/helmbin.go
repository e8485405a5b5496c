// Package helmbin provides the helm executables the chart tests run: Helm 3
// and Helm 4, built from the Go module proxy (no release binaries can be
// downloaded here) and kept in $PLOOP_CSI_CACHE/helm/<version>/helm. Helm
// is not a dependency of the project's module: each build is `go install
// module/cmd/helm@version`, outside it.
package helmbin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/mod/semver"

	"github.com/ploop-csi/ploop-csi/test/e2e/cachedbin"
)

// The releases the chart is proved with. V3 is also the Makefile's
// HELM_VERSION, which renders deploy/ (a test keeps the two equal).
const (
	V3 = "v3.22.0"
	V4 = "v4.3.1"
)

// Path returns the helm executable of version (vX.Y.Z), building it first
// when the cache lacks it.
func Path(ctx context.Context, version string, logf func(string, ...any)) (string, error) {
	if !semver.IsValid(version) || semver.Prerelease(version) != "" || semver.Canonical(version) != version {
		return "", fmt.Errorf("helm version %q is not a release vX.Y.Z", version)
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	pkg := fmt.Sprintf("helm.sh/helm/%s/cmd/helm@%s", semver.Major(version), version)
	return cachedbin.Get(ctx, "helm", version, "helm", func(ctx context.Context, work, out string) error {
		return install(ctx, work, out, pkg)
	}, logf)
}

// install runs go install pkg into out's directory. Run in work, outside
// the project's module, with no workspace: only pkg's own go.mod decides
// the dependencies. No cgo, as in helm's release builds and the Makefile's
// helm, whose compiled packages the Go build cache then shares with this.
func install(ctx context.Context, work, out, pkg string) error {
	if filepath.Base(out) != "helm" {
		return fmt.Errorf("go install names the executable helm, not %s", filepath.Base(out))
	}
	cmd := exec.CommandContext(ctx, "go", "install", pkg)
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "GOWORK=off", "CGO_ENABLED=0", "GOBIN="+filepath.Dir(out))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("go not found in PATH: %w", err)
		}
		return fmt.Errorf("go install %s: %w: %s", pkg, err, lastLines(stderr.String(), 20))
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
