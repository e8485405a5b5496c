package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

// The images the external storage suite's pods run, under the registry
// that e2eRepoList gives the suite. The names and tags are the suite's own
// (test/utils/image/manifest.go of the release): with them the pods find
// the images already on the node and never pull. The upstream images are
// Alpine or busybox with the same programs; these are Debian's static
// busybox with every applet, and agnhost built from the release's source.
const (
	e2eRegistry = "ploop-csi.invalid/e2e"
	e2eBusyBox  = e2eRegistry + "/busybox:1.37.0-1"
	e2eAgnhost  = e2eRegistry + "/agnhost:2.56"
	e2eRepoList = "promoterE2eRegistry: " + e2eRegistry + "\n"
)

// buildE2EImages writes the suite's images into dir and returns their
// archives.
func buildE2EImages(ctx context.Context, dir string, logf func(string, ...any)) ([]string, error) {
	bin, err := os.ReadFile(busyboxPath)
	if err != nil {
		return nil, fmt.Errorf("e2e images: %w (install busybox-static, see .ci/deps)", err)
	}
	list, err := exec.CommandContext(ctx, busyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("e2e images: busybox --list: %w", err)
	}
	// The suite's commands use whatever a busybox image has (mount, md5sum,
	// sed, stat -c …), at the usual paths.
	files := []imageFile{{name: "bin/", dir: true, mode: 0o755}, {name: "tmp/", dir: true, mode: 0o1777},
		{name: "etc/", dir: true, mode: 0o755}, {name: "etc/passwd", mode: 0o644, data: []byte("root:x:0:0:root:/root:/bin/sh\n")},
		{name: "etc/group", mode: 0o644, data: []byte("root:x:0:\n")}, {name: "bin/busybox", mode: 0o755, data: bin}}
	for _, a := range strings.Fields(string(list)) {
		if a != "busybox" && !strings.Contains(a, "/") {
			files = append(files, imageFile{name: "bin/" + a, link: "busybox"})
		}
	}
	path := "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	busybox := filepath.Join(dir, "e2e-busybox.tar")
	if err := writeImageConfig(e2eBusyBox, files, v1.Config{Cmd: []string{"sh"}, Env: []string{path}}, busybox); err != nil {
		return nil, err
	}
	agn, err := kubeapi.Binary(ctx, "agnhost", logf)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(agn)
	if err != nil {
		return nil, err
	}
	agnhost := filepath.Join(dir, "e2e-agnhost.tar")
	files = append(files, imageFile{name: "agnhost", mode: 0o755, data: data})
	if err := writeImageConfig(e2eAgnhost, files, v1.Config{Entrypoint: []string{"/agnhost"}, Cmd: []string{"pause"}, Env: []string{path}}, agnhost); err != nil {
		return nil, err
	}
	return []string{busybox, agnhost}, nil
}
