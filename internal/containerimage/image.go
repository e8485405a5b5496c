// Package containerimage builds the ploop-csi container image without a
// Docker daemon or a registry: a Debian 12 userland unpacked from .deb files
// and the driver's static binaries, assembled with go-containerregistry and
// written as an OCI image layout tarball, which `ctr images import` reads
// (it reads `docker save` tarballs too; the OCI layout is the standard one
// and needs no Docker-specific manifest.json). The Dockerfile at the top of
// the repository builds the equivalent image for people who have Docker;
// the labels, user, entrypoint and paths here must stay the same as there.
//
// The same sources, the same Debian package versions and the same Created
// time give the same image digest: every tar entry has that time, owner ids
// and no owner names, entries are sorted, and the binaries are built with
// -trimpath.
package containerimage

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// What the Dockerfile sets too.
const (
	Entrypoint = "/usr/bin/ploop-csi"
	// UID is the controller's user. The node plugin needs root for mounts
	// and nbd, and its DaemonSet sets runAsUser: 0.
	UID      = 65532
	UserName = "ploop-csi"
	Path     = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	Source   = "https://github.com/ploop-csi/ploop-csi"
	// Licenses is SPDX's word for "not stated": the project has not
	// chosen a licence yet.
	Licenses = "NOASSERTION"
)

// Options are a build's inputs.
type Options struct {
	// ModuleDir is the root of the ploop-csi module, whose ./cmd/ploop-csi
	// and ./cmd/ploopctl are built.
	ModuleDir string
	// Version is stamped into the binaries and the version label.
	Version string
	// Revision is the VCS revision for the revision label.
	Revision string
	// Created is every file's mtime and the image's creation time.
	Created time.Time
	// CacheDir keeps downloaded .deb files between builds; it need not
	// exist.
	CacheDir string
	// Ref names the image for `ctr images import`, e.g.
	// docker.io/ploop-csi/ploop-csi:v0.1.0.
	Ref string
	// Logf, if set, reports progress.
	Logf func(format string, args ...any)
}

// Result is what Build wrote.
type Result struct {
	// Digest is the image manifest's digest: what a pod spec's
	// image@sha256:... would name.
	Digest v1.Hash
	// Packages are the Debian packages in the image.
	Packages []Package
}

// Labels are the image's OCI annotations-as-labels.
func Labels(version, revision string) map[string]string {
	return map[string]string{
		"org.opencontainers.image.source":      Source,
		"org.opencontainers.image.title":       "ploop-csi",
		"org.opencontainers.image.description": "Kubernetes CSI driver for thin ploop and simfs volumes on plain Linux nodes",
		"org.opencontainers.image.licenses":    Licenses,
		"org.opencontainers.image.version":     version,
		"org.opencontainers.image.revision":    revision,
	}
}

// Build builds the image and writes it to out as an OCI image layout tar.
func Build(ctx context.Context, o Options, out string) (Result, error) {
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	if o.Ref == "" || o.Version == "" || o.ModuleDir == "" || o.CacheDir == "" {
		return Result{}, errors.New("build image: Ref, Version, ModuleDir and CacheDir are required")
	}
	created := o.Created.UTC().Truncate(time.Second)

	pkgs, err := ResolvePackages(ctx, RuntimePackages)
	if err != nil {
		return Result{}, fmt.Errorf("build image: %w", err)
	}
	logf("%d Debian packages", len(pkgs))
	debs, err := DownloadPackages(ctx, filepath.Join(o.CacheDir, "debs"), pkgs)
	if err != nil {
		return Result{}, fmt.Errorf("build image: %w", err)
	}
	base, err := rootfsLayer(ctx, debs, created)
	if err != nil {
		return Result{}, fmt.Errorf("build image: Debian layer: %w", err)
	}

	binDir, err := os.MkdirTemp("", "ploop-csi-image-bin-")
	if err != nil {
		return Result{}, fmt.Errorf("build image: %w", err)
	}
	defer os.RemoveAll(binDir)
	logf("building the binaries")
	if err := BuildBinaries(ctx, o.ModuleDir, binDir, o.Version); err != nil {
		return Result{}, fmt.Errorf("build image: %w", err)
	}
	app, err := appLayer(binDir, created)
	if err != nil {
		return Result{}, fmt.Errorf("build image: driver layer: %w", err)
	}

	img, err := assemble(o, created, base, app)
	if err != nil {
		return Result{}, fmt.Errorf("build image: %w", err)
	}
	digest, err := img.Digest()
	if err != nil {
		return Result{}, fmt.Errorf("build image: %w", err)
	}
	if err := WriteOCIArchive(img, o.Ref, created, out); err != nil {
		return Result{}, fmt.Errorf("build image: %w", err)
	}
	return Result{Digest: digest, Packages: pkgs}, nil
}

// BuildBinaries builds ploop-csi and ploopctl into dir: static (no cgo, so
// no libc of the build host's in them), -trimpath so no build-host path is
// in them, stripped, and the version set as the Makefile sets it.
func BuildBinaries(ctx context.Context, moduleDir, dir, version string) error {
	_, err := runToolEnv(ctx, moduleDir, []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=" + runtime.GOARCH},
		"go", "build", "-trimpath", "-ldflags", ldflags(version), "-o", dir+"/", "./cmd/ploop-csi", "./cmd/ploopctl")
	if err != nil {
		return fmt.Errorf("build the binaries: %w", err)
	}
	return nil
}

// ldflags strips the symbol and DWARF tables (the binaries are half the
// size) and sets the version as the Makefile does.
func ldflags(version string) string { return "-s -w -X main.version=" + version }

// appLayer holds the binaries and the accounts. /etc/passwd and /etc/group
// are ours because no base-passwd postinst ran; the non-root user is the
// one the Dockerfile creates, with the same ids.
func appLayer(binDir string, mtime time.Time) ([]byte, error) {
	files := map[string]*entry{
		"etc":     {hdr: tar.Header{Typeflag: tar.TypeDir, Name: "etc", Mode: 0o755}},
		"usr":     {hdr: tar.Header{Typeflag: tar.TypeDir, Name: "usr", Mode: 0o755}},
		"usr/bin": {hdr: tar.Header{Typeflag: tar.TypeDir, Name: "usr/bin", Mode: 0o755}},
		"etc/passwd": {hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/passwd", Mode: 0o644}, data: []byte(
			"root:x:0:0:root:/root:/usr/sbin/nologin\n" +
				UserName + ":x:" + strconv.Itoa(UID) + ":" + strconv.Itoa(UID) + ":ploop-csi:/nonexistent:/usr/sbin/nologin\n")},
		"etc/group": {hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/group", Mode: 0o644}, data: []byte(
			"root:x:0:\n" + UserName + ":x:" + strconv.Itoa(UID) + ":\n")},
	}
	for _, b := range []string{"ploop-csi", "ploopctl"} {
		data, err := os.ReadFile(filepath.Join(binDir, b))
		if err != nil {
			return nil, fmt.Errorf("read the built %s: %w", b, err)
		}
		files["usr/bin/"+b] = &entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "usr/bin/" + b, Mode: 0o755}, data: data}
	}
	return writeLayer(files, mtime)
}

// assemble makes the image from the two layers' tars.
func assemble(o Options, created time.Time, layers ...[]byte) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	what := []string{"Debian 12 userland: " + fmt.Sprint(RuntimePackages), "ploop-csi and ploopctl " + o.Version + ", /etc/passwd, /etc/group"}
	for i, data := range layers {
		data := data
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(data)), nil
		}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		img, err = mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{
			Created: v1.Time{Time: created}, CreatedBy: what[i], Comment: "containerimage.Build",
		}})
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = runtime.GOARCH
	cf.OS = "linux"
	cf.Created = v1.Time{Time: created}
	cf.Config = v1.Config{
		Entrypoint: []string{Entrypoint},
		User:       strconv.Itoa(UID),
		Env:        []string{"PATH=" + Path},
		Labels:     Labels(o.Version, o.Revision),
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return img, nil
}

// WriteOCIArchive writes img as an OCI image layout (oci-layout,
// index.json, blobs/) in a tar with fixed times. The index names the image
// twice: io.containerd.image.name is the full reference containerd's
// importer takes as the image's name, org.opencontainers.image.ref.name is
// the tag, as the layout spec has it.
func WriteOCIArchive(img v1.Image, ref string, mtime time.Time, out string) error {
	dir, err := os.MkdirTemp("", "ploop-csi-oci-")
	if err != nil {
		return fmt.Errorf("write OCI layout: %w", err)
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("write OCI layout: %w", err)
	}
	tag := ref
	if i := lastColonAfterSlash(ref); i >= 0 {
		tag = ref[i+1:]
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return fmt.Errorf("write OCI layout: %w", err)
	}
	return tarDir(dir, out, mtime)
}

// lastColonAfterSlash finds the tag separator of an image reference (a
// registry's port has a colon too, but before a slash).
func lastColonAfterSlash(ref string) int {
	for i := len(ref) - 1; i >= 0; i-- {
		switch ref[i] {
		case ':':
			return i
		case '/':
			return -1
		}
	}
	return -1
}

// tarDir writes dir's files to a tar at out in sorted order with fixed
// times and owners. The tar appears only by a rename.
func tarDir(dir, out string, mtime time.Time) error {
	var names []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			names = append(names, p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("archive OCI layout: %w", err)
	}
	sort.Strings(names)
	f, err := os.CreateTemp(filepath.Dir(out), ".tmp-"+filepath.Base(out))
	if err != nil {
		return fmt.Errorf("archive OCI layout: %w", err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, p := range names {
		st, err := os.Lstat(p)
		if err != nil {
			return fmt.Errorf("archive OCI layout: %w", err)
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return fmt.Errorf("archive OCI layout: %w", err)
		}
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: mtime, Mode: 0o644, Typeflag: tar.TypeReg}
		switch {
		case st.IsDir():
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
		case st.Mode().IsRegular():
			h.Size = st.Size()
		default:
			return fmt.Errorf("archive OCI layout: %s is neither file nor directory", p)
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("archive OCI layout: %w", err)
		}
		if h.Typeflag == tar.TypeReg {
			if err := copyFile(tw, p); err != nil {
				return fmt.Errorf("archive OCI layout: %w", err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("archive OCI layout: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("archive OCI layout: %w", err)
	}
	if err := os.Rename(f.Name(), out); err != nil {
		return fmt.Errorf("archive OCI layout: %w", err)
	}
	return nil
}

func copyFile(w io.Writer, p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}
