package containerimage

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
)

// TestBuild builds the image twice from the same inputs, expects the same
// bytes, then reads it back as a consumer would and runs programs from its
// root file system. The .deb files are downloaded once into the project's
// cache; the binaries build from the Go build cache.
func TestBuild(t *testing.T) {
	testcmd.Need(t, "apt-cache", "apt-get", "dpkg-deb", "go")
	moduleDir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(moduleDir, "go.mod")); err != nil {
		t.Fatalf("module root not at %s: %v", moduleDir, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	const version = "v0.0.0-imagetest"
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	opts := Options{
		ModuleDir: moduleDir, Version: version, Revision: "0123456789abcdef",
		Created: created, CacheDir: DefaultCacheDir(),
		Ref: "docker.io/ploop-csi/ploop-csi:" + version, Logf: t.Logf,
	}
	dir := t.TempDir()
	var digests []string
	var sums [][32]byte
	for _, name := range []string{"a.tar", "b.tar"} {
		res, err := Build(ctx, opts, filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, res.Digest.String())
		sums = append(sums, sha256.Sum256(data))
		t.Logf("%s: image %s, %d bytes, %d Debian packages", name, res.Digest, len(data), len(res.Packages))
	}
	if digests[0] != digests[1] || sums[0] != sums[1] {
		t.Fatalf("two builds of the same inputs differ: digests %v, tarballs %x %x", digests, sums[0], sums[1])
	}

	img := readBack(t, filepath.Join(dir, "a.tar"), opts.Ref, digests[0])
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Config.User != "65532" {
		t.Errorf("user %q, want 65532", cf.Config.User)
	}
	if got := strings.Join(cf.Config.Entrypoint, " "); got != "/usr/bin/ploop-csi" {
		t.Errorf("entrypoint %q, want /usr/bin/ploop-csi", got)
	}
	if !cf.Created.Time.Equal(created) || cf.OS != "linux" || cf.Architecture == "" {
		t.Errorf("created %v, platform %s/%s: want %v on linux", cf.Created, cf.OS, cf.Architecture, created)
	}
	for k, v := range Labels(version, opts.Revision) {
		if cf.Config.Labels[k] != v || v == "" {
			t.Errorf("label %s = %q, want %q", k, cf.Config.Labels[k], v)
		}
	}

	root := t.TempDir()
	// The image user must be able to enter its root after chroot.
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	files := extract(t, img, root, created)

	for _, bin := range []string{"usr/bin/ploop-csi", "usr/bin/ploopctl"} {
		h, ok := files[bin]
		if !ok || h.Typeflag != tar.TypeReg || h.Mode&0o111 != 0o111 {
			t.Errorf("/%s: %+v, want an executable file", bin, h)
			continue
		}
		data, err := os.ReadFile(filepath.Join(root, bin))
		if err != nil {
			t.Fatal(err)
		}
		// -trimpath: the build host's checkout must not show.
		if bytes.Contains(data, []byte(moduleDir)) {
			t.Errorf("/%s contains the build path %s", bin, moduleDir)
		}
	}
	// The programs the node plugin and mount-utils run, as PATH finds them.
	for _, tool := range []string{"mkfs.ext4", "mkfs.xfs", "mount", "umount", "blkid", "losetup", "modprobe",
		"e2fsck", "resize2fs", "xfs_growfs", "xfs_admin", "xfs_info", "fsck", "fsck.ext4", "fsck.xfs",
		"setquota", "repquota", "sh", "expr"} {
		if lookPath(files, tool) == "" {
			t.Errorf("%s is not in the image's PATH", tool)
		}
	}
	for _, tool := range []string{"gcc", "cc", "c++", "go", "as", "ld", "make", "apt-get", "dpkg"} {
		if p := lookPath(files, tool); p != "" {
			t.Errorf("%s is in the image at %s; it must carry no build tools", tool, p)
		}
	}
	for _, f := range []string{"etc/passwd", "etc/group"} {
		data, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(data, []byte("ploop-csi:x:65532:")) {
			t.Errorf("/%s has no ploop-csi with id 65532:\n%s", f, data)
		}
	}

	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("running programs inside the image needs root (chroot); CI runs as root")
		}
		t.Skip("running programs inside the image needs root (chroot)")
	}
	// As in a container: the tools read the mount table.
	proc := filepath.Join(root, "proc")
	if err := syscall.Mount("proc", proc, "proc", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil {
		t.Fatalf("mount proc at %s: %v", proc, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(proc, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", proc, err)
		}
	})
	// Inside the image's root, with its own loader and libraries: proof
	// that the userland is complete (every shared library resolves without
	// an ld.so.cache) and that the driver is static.
	runs := []struct {
		argv []string
		uid  uint32
		want string
	}{
		{[]string{"/usr/bin/ploop-csi", "--version"}, UID, version},
		{[]string{"/usr/sbin/mkfs.ext4", "-V"}, 0, "mke2fs 1.47"},
		{[]string{"/sbin/mkfs.xfs", "-V"}, 0, "mkfs.xfs version"},
		{[]string{"/usr/sbin/xfs_growfs", "-V"}, 0, "xfs_growfs version"},
		// Shell scripts: /bin/sh and what they call must be there.
		{[]string{"/usr/sbin/xfs_admin", "-V"}, 0, "xfs_admin version"},
		{[]string{"/usr/sbin/xfs_info", "-V"}, 0, "xfs_info version"},
		{[]string{"/usr/sbin/xfs_freeze", "-V"}, 0, "xfs_freeze version"},
		{[]string{"/bin/mount", "--version"}, UID, "mount from util-linux"},
		{[]string{"/usr/sbin/blkid", "-V"}, 0, "blkid from util-linux"},
		{[]string{"/usr/sbin/modprobe", "--version"}, 0, "kmod version"},
		{[]string{"/usr/sbin/setquota", "-V"}, 0, "Quota utilities version"},
		// File systems on files: the tools do their real work.
		{[]string{"truncate", "-s", "16M", "/tmp/ext4.img"}, 0, ""},
		{[]string{"mkfs.ext4", "-F", "-q", "/tmp/ext4.img"}, 0, ""},
		{[]string{"truncate", "-s", "32M", "/tmp/ext4.img"}, 0, ""},
		{[]string{"resize2fs", "/tmp/ext4.img"}, 0, "is now 32768 (1k) blocks long"},
		{[]string{"e2fsck", "-fn", "/tmp/ext4.img"}, 0, "/tmp/ext4.img: 11/"},
		{[]string{"truncate", "-s", "300M", "/tmp/xfs.img"}, 0, ""},
		{[]string{"mkfs.xfs", "-q", "/tmp/xfs.img"}, 0, ""},
		{[]string{"xfs_admin", "-l", "/tmp/xfs.img"}, 0, "label = \"\""},
	}
	for _, r := range runs {
		// Resolved inside the image, as its PATH would.
		prog := r.argv[0]
		if !strings.HasPrefix(prog, "/") {
			if prog = lookPath(files, prog); prog == "" {
				t.Errorf("%s is not in the image", r.argv[0])
				continue
			}
		}
		cmd := exec.CommandContext(ctx, prog, r.argv[1:]...)
		cmd.Dir = "/"
		cmd.Env = []string{"PATH=" + Path}
		cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root, Credential: &syscall.Credential{Uid: r.uid, Gid: r.uid}}
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), r.want) {
			t.Errorf("chroot %s %v as uid %d: %v, output %q, want %q in it", root, r.argv, r.uid, err, out, r.want)
		}
	}
}

// readBack opens the OCI layout tarball as an importer would and returns
// its one image, checking the names containerd will give it.
func readBack(t *testing.T, tarball, ref, digest string) v1.Image {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Open(tarball)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(path.Clean(h.Name)))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("%s in the OCI tarball has type %q", h.Name, h.Typeflag)
		}
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(im.Manifests))
	}
	d := im.Manifests[0]
	if d.Digest.String() != digest {
		t.Errorf("index names %s, the build reported %s", d.Digest, digest)
	}
	if d.Annotations["io.containerd.image.name"] != ref || !strings.HasSuffix(ref, ":"+d.Annotations["org.opencontainers.image.ref.name"]) {
		t.Errorf("index annotations %v do not name %s", d.Annotations, ref)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// extract writes the image's flattened file system below root and returns
// its headers by path; every layer entry must carry the build's time and
// no owner names.
func extract(t *testing.T, img v1.Image, root string, mtime time.Time) map[string]*tar.Header {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if !h.ModTime.Equal(mtime) || h.Uname != "" || h.Gname != "" {
				t.Errorf("layer %d: %s has mtime %v and owner %q/%q, want %v and no names", i, h.Name, h.ModTime, h.Uname, h.Gname, mtime)
			}
		}
		rc.Close()
	}

	files := map[string]*tar.Header{}
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		name := path.Clean(h.Name)
		files[name] = h
		p := filepath.Join(root, name)
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, os.FileMode(h.Mode).Perm())
		case tar.TypeReg:
			var data []byte
			if data, err = io.ReadAll(tr); err == nil {
				err = os.WriteFile(p, data, os.FileMode(h.Mode).Perm())
			}
		case tar.TypeSymlink:
			err = os.Symlink(h.Linkname, p)
		case tar.TypeLink:
			err = os.Link(filepath.Join(root, h.Linkname), p)
		default:
			t.Fatalf("%s has tar type %q", h.Name, h.Typeflag)
		}
		if err != nil {
			t.Fatalf("extract %s: %v", h.Name, err)
		}
	}
	return files
}

// lookPath finds a program in the image as the image's PATH would,
// following symlinks inside the image; "" if there is none.
func lookPath(files map[string]*tar.Header, prog string) string {
	for _, dir := range strings.Split(Path, ":") {
		p := strings.TrimPrefix(path.Join(dir, prog), "/")
		if h := resolve(files, p, 0); h != nil && h.Typeflag != tar.TypeDir && h.Mode&0o111 != 0 {
			return "/" + p
		}
	}
	return ""
}

// resolve follows symlinks (of the file and of its parent directories)
// within the image's files.
func resolve(files map[string]*tar.Header, p string, depth int) *tar.Header {
	if depth > 40 {
		return nil
	}
	parts := strings.Split(p, "/")
	for i := range parts {
		prefix := strings.Join(parts[:i+1], "/")
		h, ok := files[prefix]
		if !ok {
			return nil
		}
		if h.Typeflag == tar.TypeSymlink {
			target := h.Linkname
			if !path.IsAbs(target) {
				target = path.Join(path.Dir(prefix), target)
			}
			rest := path.Join(append([]string{strings.TrimPrefix(path.Clean("/"+target), "/")}, parts[i+1:]...)...)
			return resolve(files, rest, depth+1)
		}
		if h.Typeflag == tar.TypeLink && i == len(parts)-1 {
			return resolve(files, h.Linkname, depth+1)
		}
	}
	return files[p]
}
