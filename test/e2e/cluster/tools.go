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
var toolsApplets = []string{"sh", "cat", "dd", "echo", "ls", "mkdir", "rm", "sleep", "sync", "test", "touch", "cmp", "df", "stat", "sha256sum", "head", "wc", "id"}

// buildToolsImage writes the tools image as an OCI archive to out. Its
// entrypoint sleeps forever, so that as a sandbox image it just holds the
// pod's namespaces.
func buildToolsImage(out string) error {
	bin, err := os.ReadFile(busyboxPath)
	if err != nil {
		return fmt.Errorf("tools image: %w (install busybox-static, see .ci/deps)", err)
	}
	mtime := time.Unix(0, 0).UTC()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, data []byte) error {
		h.ModTime, h.Format = mtime, tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add(&tar.Header{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755}, nil); err != nil {
		return err
	}
	if err := add(&tar.Header{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777}, nil); err != nil {
		return err
	}
	if err := add(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin))}, bin); err != nil {
		return err
	}
	for _, a := range toolsApplets {
		if err := add(&tar.Header{Name: "bin/" + a, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}, nil); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return fmt.Errorf("tools image: %w", err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	if img, err = mutate.AppendLayers(img, layer); err != nil {
		return fmt.Errorf("tools image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("tools image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Created = runtime.GOARCH, "linux", v1.Time{Time: mtime}
	cf.Config = v1.Config{Entrypoint: []string{"/bin/sleep", "2147483647"}, Env: []string{"PATH=/bin"}}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return fmt.Errorf("tools image: %w", err)
	}
	return containerimage.WriteOCIArchive(img, ToolsImage, mtime, out)
}
