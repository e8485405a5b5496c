package cluster

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/ploop-csi/ploop-csi/internal/containerimage"
)

// ToolsImage is the reference of the tools image: busybox, enough for the
// tests' pods (sh, dd, sync, sleep) and for the sandbox of every pod.
const ToolsImage = "ploop-csi.invalid/e2e/tools:1"

// busyboxPath is Debian's busybox-static.
const busyboxPath = "/bin/busybox"

// toolsApplets are linked to busybox in the image's /bin.
var toolsApplets = []string{"sh", "cat", "dd", "echo", "ls", "mkdir", "rm", "sleep", "sync", "test", "touch", "cmp", "df", "stat", "sha256sum", "head", "wc", "id", "yes", "tr", "tail", "cut", "blockdev", "grep", "find", "dmesg", "tee", "httpd"}

// buildToolsImage writes the tools image as an OCI archive to out. Its
// entrypoint sleeps forever, so that as a sandbox image it just holds the
// pod's namespaces.
func buildToolsImage(out string) error {
	bin, err := os.ReadFile(busyboxPath)
	if err != nil {
		return fmt.Errorf("tools image: %w (install busybox-static, see .ci/deps)", err)
	}
	files := []imageFile{{name: "bin/", dir: true, mode: 0o755}, {name: "tmp/", dir: true, mode: 0o1777},
		{name: "bin/busybox", mode: 0o755, data: bin}}
	for _, a := range toolsApplets {
		files = append(files, imageFile{name: "bin/" + a, link: "busybox"})
	}
	return writeImage(ToolsImage, files, []string{"/bin/sleep", "2147483647"}, out)
}

// imageFile is one entry of a single-layer image: a directory, a symlink
// (link) or a regular file (data).
type imageFile struct {
	name string
	dir  bool
	link string
	mode int64
	data []byte
}

// writeImage writes an image of one layer holding files, with entrypoint,
// as an OCI archive named ref at out. Times are fixed, so the same files
// give the same image.
func writeImage(ref string, files []imageFile, entrypoint []string, out string) error {
	return writeImageConfig(ref, files, v1.Config{Entrypoint: entrypoint, Env: []string{"PATH=/bin"}}, out)
}

// writeImageConfig is writeImage with the whole run configuration.
func writeImageConfig(ref string, files []imageFile, config v1.Config, out string) error {
	mtime := time.Unix(0, 0).UTC()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: mtime, Format: tar.FormatPAX}
		switch {
		case f.dir:
			h.Typeflag = tar.TypeDir
		case f.link != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, f.link, 0o777
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("image %s: %w", ref, err)
		}
		if _, err := tw.Write(f.data); err != nil {
			return fmt.Errorf("image %s: %w", ref, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	if img, err = mutate.AppendLayers(img, layer); err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Created = runtime.GOARCH, "linux", v1.Time{Time: mtime}
	cf.Config = config
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return fmt.Errorf("image %s: %w", ref, err)
	}
	return containerimage.WriteOCIArchive(img, ref, mtime, out)
}
