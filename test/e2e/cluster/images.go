package cluster

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/mod/modfile"

	"github.com/ploop-csi/ploop-csi/internal/containerimage"
	"github.com/ploop-csi/ploop-csi/test/e2e/cachedbin"
	"github.com/ploop-csi/ploop-csi/test/e2e/gomod"
)

// Sidecar is a CSI sidecar of the chart, built from its release on the Go
// module proxy (the registry images are out of reach).
type Sidecar struct {
	Name    string // the command, and the image's name
	Module  string
	Version string
	// Value is the chart's image key (image.<Value>.repository, .tag).
	Value string
}

// Sidecars are the controller's sidecars at the chart's default versions.
// node-driver-registrar and livenessprobe are not on the module proxy:
// the e2e values use the driver's built-in registration and its own
// /healthz instead.
var Sidecars = []Sidecar{
	{"csi-provisioner", "github.com/kubernetes-csi/external-provisioner/v6", "v6.4.0", "provisioner"},
	{"csi-snapshotter", "github.com/kubernetes-csi/external-snapshotter/v8", "v8.7.0", "snapshotter"},
	{"csi-resizer", "github.com/kubernetes-csi/external-resizer/v2", "v2.3.0", "resizer"},
}

// SnapshotController runs on the host with the control plane (built the
// same way as the sidecars, from the snapshotter's release).
var SnapshotController = Sidecar{"snapshot-controller", "github.com/kubernetes-csi/external-snapshotter/v8", "v8.7.0", ""}

// snapshotCRDModule holds the snapshot CRDs, installed with the control
// plane (the chart needs them).
const snapshotCRDModule = "github.com/kubernetes-csi/external-snapshotter/client/v8@v8.7.0"

// Repository is the sidecar image's repository (tag: its Version).
func (s Sidecar) Repository() string { return "ploop-csi.invalid/e2e/" + s.Name }

// Ref is the sidecar image's reference.
func (s Sidecar) Ref() string { return s.Repository() + ":" + s.Version }

// Binary returns the sidecar's static binary, building it into the cache
// first when it lacks it: in the module's own directory, with its go.mod
// and go.sum (whose replace directives a dependent module would not get).
func (s Sidecar) Binary(ctx context.Context, logf func(string, ...any)) (string, error) {
	return cachedbin.Get(ctx, s.Name, s.Version, s.Name, func(ctx context.Context, work, out string) error {
		src, err := gomod.Dir(ctx, s.Module+"@"+s.Version)
		if err != nil {
			return err
		}
		dir := filepath.Join(work, "src")
		if err := copyModule(src, dir, s.Version); err != nil {
			return fmt.Errorf("build %s: %w", s.Name, err)
		}
		args := []string{"-n", "10", "go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=" + s.Version, "-o", out, "./cmd/" + s.Name}
		cmd := exec.CommandContext(ctx, "nice", args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod", "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build %s %s: %w: %s", s.Name, s.Version, err, tail(string(b), 3000))
		}
		return nil
	}, logf)
}

// copyModule copies a module from the (read-only) module cache to dir,
// replacing its replace directives that name a directory of its repository
// (external-snapshotter's ./client, a nested module that is not in the
// module's zip) with that module's release of the same version.
func copyModule(src, dir, version string) error {
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dir, rel)
		if d.IsDir() {
			return os.MkdirAll(to, 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(to, data, 0o644)
	})
	if err != nil {
		return err
	}
	gm := filepath.Join(dir, "go.mod")
	data, err := os.ReadFile(gm)
	if err != nil {
		return err
	}
	f, err := modfile.Parse(gm, data, nil)
	if err != nil {
		return err
	}
	for _, r := range f.Replace {
		if strings.HasPrefix(r.New.Path, "./") || strings.HasPrefix(r.New.Path, "../") {
			if err := f.AddReplace(r.Old.Path, r.Old.Version, r.Old.Path, version); err != nil {
				return err
			}
		}
	}
	out, err := f.Format()
	if err != nil {
		return err
	}
	return os.WriteFile(gm, out, 0o644)
}

// WriteImage writes the sidecar's image (its binary alone) to out.
func (s Sidecar) WriteImage(ctx context.Context, out string, logf func(string, ...any)) error {
	bin, err := s.Binary(ctx, logf)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	return writeImage(s.Ref(), []imageFile{{name: s.Name, mode: 0o755, data: data}}, []string{"/" + s.Name}, out)
}

// DriverImage is the driver's image in the cluster.
const (
	DriverRepository = "ploop-csi.invalid/e2e/ploop-csi"
	DriverTag        = "e2e"
)

// WriteDriverImage builds the driver's image from the module at moduleDir
// (internal/containerimage, as `make image` does) to out.
func WriteDriverImage(ctx context.Context, moduleDir, out string, logf func(string, ...any)) error {
	_, err := containerimage.Build(ctx, containerimage.Options{
		ModuleDir: moduleDir, Version: "e2e", Revision: "e2e", Created: time.Unix(0, 0),
		CacheDir: containerimage.DefaultCacheDir(), Ref: DriverRepository + ":" + DriverTag, Logf: logf,
	}, out)
	return err
}

// ImageValues are the chart's --set values that point every image at the
// ones the node imported, never pulled.
func ImageValues() []string {
	v := []string{"image.pullPolicy=Never", "image.driver.repository=" + DriverRepository, "image.driver.tag=" + DriverTag}
	for _, s := range Sidecars {
		v = append(v, "image."+s.Value+".repository="+s.Repository(), "image."+s.Value+".tag="+s.Version)
	}
	return v
}

// moduleRoot is the ploop-csi module's directory, found from the working
// directory (a package's, under go test).
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/ploop-csi/ploop-csi\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no ploop-csi go.mod above the working directory")
		}
		dir = parent
	}
}
