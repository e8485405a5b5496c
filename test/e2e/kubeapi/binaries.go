package kubeapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"golang.org/x/mod/modfile"

	"github.com/ploop-csi/ploop-csi/test/e2e/cachedbin"
)

// KubernetesVersion is the kube-apiserver the tests run: the minor of the
// k8s.io/* libraries in go.mod, so the server speaks the API the driver's
// clients were built against.
const KubernetesVersion = "v1.34.4"

// Paths are the control plane's executables.
type Paths struct {
	Etcd          string
	KubeAPIServer string
}

// etcdCandidates are where Debian's etcd-server installs etcd; PATH is
// searched first so a developer may bring their own.
var etcdCandidates = []string{"/usr/bin/etcd"}

// Binaries returns etcd and kube-apiserver, building kube-apiserver into the
// cache when it is not there yet. Concurrent test processes serialise on a
// lock file in the cache, so two packages' tests build it once.
func Binaries(ctx context.Context, logf func(string, ...any)) (Paths, error) {
	etcd, err := findEtcd()
	if err != nil {
		return Paths{}, err
	}
	apiserver, err := kubeAPIServer(ctx, logf)
	if err != nil {
		return Paths{}, err
	}
	return Paths{Etcd: etcd, KubeAPIServer: apiserver}, nil
}

func findEtcd() (string, error) {
	if p, err := exec.LookPath("etcd"); err == nil {
		return p, nil
	}
	for _, p := range etcdCandidates {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("no etcd in PATH or at %s: install Debian's etcd-server (see .ci/deps)", strings.Join(etcdCandidates, ", "))
}

// kubeAPIServer returns the cached kube-apiserver of KubernetesVersion,
// building it first if needed. Its lock is its own, not vmtest's: a VM test
// preparing its kernel must not wait for a ten-minute compile.
func kubeAPIServer(ctx context.Context, logf func(string, ...any)) (string, error) {
	return Binary(ctx, "kube-apiserver", logf)
}

// Commands are the k8s.io/kubernetes programs Binary builds: the
// control plane and the kubelet, kubectl, and for the external storage
// suite its test binary (e2e.test) and agnhost, the binary of one of the
// images its pods run.
var Commands = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl", "agnhost", E2ETest}

// E2ETest is the Kubernetes end-to-end suite's test binary, built with
// "go test -c" from k8s.io/kubernetes/test/e2e.
const E2ETest = "e2e.test"

// commandPackage is where command lives in k8s.io/kubernetes.
func commandPackage(command string) string {
	switch command {
	case E2ETest:
		return "k8s.io/kubernetes/test/e2e"
	case "agnhost":
		return "k8s.io/kubernetes/test/images/agnhost"
	}
	return "k8s.io/kubernetes/cmd/" + command
}

// Binary returns the cached command (one of Commands) of
// KubernetesVersion, building it first if needed: the rest of a cluster
// (the controller manager, the scheduler, a kubelet) comes from the same
// release as the API server.
func Binary(ctx context.Context, command string, logf func(string, ...any)) (string, error) {
	if !slices.Contains(Commands, command) {
		return "", fmt.Errorf("kubeapi: no command %q (want one of %s)", command, strings.Join(Commands, ", "))
	}
	return cachedbin.Get(ctx, "kube", KubernetesVersion, command, func(ctx context.Context, work, out string) error {
		return buildKubeCommand(ctx, work, out, command)
	}, logf)
}

// buildKubeCommand compiles command into out from a module written in
// work. k8s.io/kubernetes is not meant to be required: its go.mod
// requires its staging modules at v0.0.0 and replaces them with directories
// of its own repository, which a dependent does not get. Replacing each with
// its published release of the same patch level gives the exact sources of
// the release, and every other dependency stays at the version the release
// pins.
func buildKubeCommand(ctx context.Context, work, out, command string) error {
	gomod, err := downloadModFile(ctx, work, "k8s.io/kubernetes@"+KubernetesVersion)
	if err != nil {
		return err
	}
	staging, err := stagingModules(gomod)
	if err != nil {
		return err
	}
	src, err := buildModule(KubernetesVersion, staging)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(work, "go.mod"), src, 0o644); err != nil {
		return err
	}
	args := []string{"build", "-trimpath", "-ldflags", versionLDFlags(KubernetesVersion), "-o", out, commandPackage(command)}
	if command == E2ETest {
		args[0] = "test"
		args = slices.Insert(args, 1, "-c")
	}
	name := "go"
	// The machine is shared with VM tests whose timing matters more than
	// this compile's.
	if nice, err := exec.LookPath("nice"); err == nil {
		name, args = nice, append([]string{"-n", "10", "go"}, args...)
	}
	if _, err := goCommand(ctx, work, name, args...); err != nil {
		return err
	}
	return nil
}

// downloadModFile fetches module@version into the module cache and returns
// its go.mod.
func downloadModFile(ctx context.Context, work, modVersion string) ([]byte, error) {
	out, err := goCommand(ctx, work, "go", "mod", "download", "-json", modVersion)
	if err != nil {
		return nil, err
	}
	var info struct {
		GoMod string
		Error string
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return nil, fmt.Errorf("go mod download %s: %w", modVersion, err)
	}
	if info.Error != "" || info.GoMod == "" {
		return nil, fmt.Errorf("go mod download %s: %q", modVersion, info.Error)
	}
	return os.ReadFile(info.GoMod)
}

// stagingModules lists the modules k8s.io/kubernetes replaces with its own
// ./staging/src directories.
func stagingModules(gomod []byte) ([]string, error) {
	f, err := modfile.Parse("k8s.io/kubernetes/go.mod", gomod, nil)
	if err != nil {
		return nil, err
	}
	var mods []string
	for _, r := range f.Replace {
		if r.New.Version == "" && strings.HasPrefix(r.New.Path, "./staging/src/") {
			mods = append(mods, r.Old.Path)
		}
	}
	if len(mods) == 0 {
		return nil, errors.New("k8s.io/kubernetes's go.mod replaces no ./staging modules: the build recipe no longer fits this release")
	}
	sort.Strings(mods)
	return mods, nil
}

// stagingVersion is the k8s.io/* library release cut with a Kubernetes
// release: v1.34.4 → v0.34.4.
func stagingVersion(kube string) (string, error) {
	rest, ok := strings.CutPrefix(kube, "v1.")
	if !ok {
		return "", fmt.Errorf("kubernetes version %q is not v1.x.y", kube)
	}
	return "v0." + rest, nil
}

func buildModule(kube string, staging []string) ([]byte, error) {
	lib, err := stagingVersion(kube)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "module ploop-csi.invalid/kube-apiserver-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n", kube)
	for _, m := range staging {
		fmt.Fprintf(&b, "\t%s => %s %s\n", m, m, lib)
	}
	b.WriteString(")\n")
	return b.Bytes(), nil
}

// versionLDFlags stamps the version the release build would: without it the
// server reports v0.0.0-master, and clients that compare versions (and the
// server's own compatibility-version checks) see a version that never was.
func versionLDFlags(kube string) string {
	major, minor := "1", ""
	if parts := strings.SplitN(strings.TrimPrefix(kube, "v"), ".", 3); len(parts) >= 2 {
		major, minor = parts[0], parts[1]
	}
	flags := []string{"-s", "-w"}
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		flags = append(flags,
			"-X", pkg+".gitVersion="+kube,
			"-X", pkg+".gitMajor="+major,
			"-X", pkg+".gitMinor="+minor,
			"-X", pkg+".gitTreeState=clean",
		)
	}
	return strings.Join(flags, " ")
}

// goCommand runs the go tool (possibly under nice) in dir with an environment
// that makes the throw-away module self-contained: no workspace, go.sum
// filled in as needed, no cgo (the release binaries are static too).
func goCommand(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod", "CGO_ENABLED=0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("%s not found in PATH: %w", name, err)
		}
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, tail(stderr.Bytes(), 3000))
	}
	return out, nil
}

// tail is the end of b, at most n bytes, from a line start where possible.
func tail(b []byte, n int) string {
	s := strings.TrimSpace(string(b))
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 && i < len(s)-1 {
		s = s[i+1:]
	}
	return "...\n" + s
}
