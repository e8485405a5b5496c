package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/ploop-csi/ploop-csi/test/e2e/cachedbin"
)

// kernelMetaPackage is Debian's package that always depends on the current
// stock kernel; following it (instead of naming an ABI) keeps the harness on
// a kernel the distribution still serves.
const kernelMetaPackage = "linux-image-amd64"

// bootFiles are what qemu boots.
type bootFiles struct {
	Kernel    string // vmlinuz (bzImage)
	PVHKernel string // uncompressed vmlinux with a PVH entry; may not exist
	Initramfs string // uncompressed newc cpio
	Release   string // uname -r of the guest, e.g. 6.1.0-56-amd64
	Package   string // Debian package and version it came from
}

// cacheDir returns where downloads and built initramfs images are kept:
// $PLOOP_CSI_CACHE, else $XDG_CACHE_HOME/ploop-csi, else ~/.cache/ploop-csi
// (else a directory under the temp dir).
// The harness creates it as needed and never relies on earlier contents.
func cacheDir() (string, error) {
	if d := os.Getenv("PLOOP_CSI_CACHE"); d != "" {
		return d, nil
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "ploop-csi"), nil
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".cache", "ploop-csi"), nil
	}
	// No home (some CI sandboxes): a per-user directory that only lives as
	// long as the machine's temp dir.
	return filepath.Join(os.TempDir(), fmt.Sprintf("ploop-csi-cache-%d", os.Getuid())), nil
}

// Kernel612 is Debian 12's 6.12 kernel (a meta-package following its
// point releases): it has ublk_drv, which the default 6.1 kernel lacks.
// Tests that need ublk boot it with Options.Kernel.
const Kernel612 = "linux-image-6.12-amd64"

// kernelPackage names the concrete kernel package to boot: want (a kernel
// package, or a meta-package such as Kernel612) if set, else
// $PLOOP_CSI_VM_KERNEL_PKG if set, else what linux-image-amd64 depends on.
func kernelPackage(ctx context.Context, want string) (string, error) {
	if want == "" {
		if p := os.Getenv("PLOOP_CSI_VM_KERNEL_PKG"); p != "" {
			return p, nil
		}
		want = kernelMetaPackage
	}
	out, err := runTool(ctx, "", "apt-cache", "depends", want)
	if err != nil {
		return "", fmt.Errorf("find the kernel package behind %s: %w", want, err)
	}
	pkg, err := parseAptDepends(out, "linux-image-")
	if err != nil {
		if want != kernelMetaPackage {
			return want, nil // a concrete kernel package depends on no other
		}
		return "", fmt.Errorf("find the kernel package behind %s: %w", want, err)
	}
	return pkg, nil
}

// parseAptDepends returns the first "Depends:" target of apt-cache depends
// output whose name starts with prefix.
func parseAptDepends(out []byte, prefix string) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		line = strings.TrimPrefix(line, "|") // alternatives
		dep, ok := strings.CutPrefix(line, "Depends:")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		if strings.HasPrefix(dep, prefix) && !strings.ContainsAny(dep, " <>/") {
			return dep, nil
		}
	}
	return "", fmt.Errorf("no \"Depends: %s...\" line in apt-cache output %q", prefix, out)
}

// packageVersion is the candidate version apt would download.
func packageVersion(ctx context.Context, pkg string) (string, error) {
	out, err := runTool(ctx, "", "apt-cache", "show", "--no-all-versions", pkg)
	if err != nil {
		return "", fmt.Errorf("look up kernel package %s (is it in the apt lists? try apt-get update): %w", pkg, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Version: "); ok {
			v = strings.TrimSpace(v)
			if v == "" || strings.ContainsAny(v, "/ ") {
				break
			}
			return v, nil
		}
	}
	return "", fmt.Errorf("look up kernel package %s: no Version in apt-cache show output", pkg)
}

// prepareBoot returns the guest kernel and an initramfs for it, downloading
// and building them into the cache when they are not there yet. Concurrent
// test processes serialise on a lock file in the cache.
func prepareBoot(ctx context.Context, kernel string, logf func(string, ...any)) (bootFiles, error) {
	busybox, err := findBusybox()
	if err != nil {
		return bootFiles{}, err
	}
	pkg, err := kernelPackage(ctx, kernel)
	if err != nil {
		return bootFiles{}, err
	}
	version, err := packageVersion(ctx, pkg)
	if err != nil {
		return bootFiles{}, err
	}
	cache, err := cacheDir()
	if err != nil {
		return bootFiles{}, err
	}
	recipe, err := recipeHash(busybox)
	if err != nil {
		return bootFiles{}, err
	}
	key := pkg + "_" + version + "_" + recipe
	dir := filepath.Join(cache, "boot", key)
	files := bootFiles{
		Kernel:    filepath.Join(dir, "vmlinuz"),
		PVHKernel: filepath.Join(dir, "vmlinux"),
		Initramfs: filepath.Join(dir, "initramfs.cpio"),
		Package:   pkg + " " + version,
	}
	if rel, err := os.ReadFile(filepath.Join(dir, "release")); err == nil {
		files.Release = string(rel)
		now := time.Now()
		os.Chtimes(dir, now, now) // in use: keep it from pruneCache
		return files, nil
	}

	if err := os.MkdirAll(cache, 0o755); err != nil {
		return bootFiles{}, fmt.Errorf("create cache dir: %w", err)
	}
	unlock, err := cachedbin.LockFile(filepath.Join(cache, ".lock"))
	if err != nil {
		return bootFiles{}, err
	}
	defer unlock()
	if rel, err := os.ReadFile(filepath.Join(dir, "release")); err == nil { // built while we waited
		files.Release = string(rel)
		return files, nil
	}

	deb, err := downloadDeb(ctx, filepath.Join(cache, "debs"), pkg, version, logf)
	if err != nil {
		return bootFiles{}, err
	}
	logf("vmtest: building initramfs for %s %s in %s", pkg, version, dir)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return bootFiles{}, fmt.Errorf("create cache dir: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".build-")
	if err != nil {
		return bootFiles{}, fmt.Errorf("create build dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	release, err := buildBootFiles(ctx, deb, busybox, tmp, logf)
	if err != nil {
		return bootFiles{}, fmt.Errorf("build guest boot files from %s: %w", deb, err)
	}
	if err := os.Rename(filepath.Join(tmp, "out"), dir); err != nil {
		return bootFiles{}, fmt.Errorf("install boot files in cache: %w", err)
	}
	files.Release = release
	pruneCache(cache, dir, deb, logf)
	return files, nil
}

// pruneCache removes boot files and packages other than keepDir and keepDeb
// that were not used for a day, so the cache does not grow by a kernel per
// Debian point release or harness change; build and download leftovers of
// crashed runs go too. Other checkouts (older harnesses) still using an entry
// refresh its time on every boot.
func pruneCache(cache, keepDir, keepDeb string, logf func(string, ...any)) {
	cutoff := time.Now().Add(-24 * time.Hour)
	for _, sub := range []string{"boot", "debs"} {
		entries, err := os.ReadDir(filepath.Join(cache, sub))
		if err != nil {
			continue
		}
		for _, e := range entries {
			p := filepath.Join(cache, sub, e.Name())
			info, err := e.Info()
			if p == keepDir || p == keepDeb || err != nil || info.ModTime().After(cutoff) {
				continue
			}
			if err := os.RemoveAll(p); err != nil {
				logf("vmtest: prune cache: %v", err)
			} else {
				logf("vmtest: pruned stale cache entry %s", p)
			}
		}
	}
}

// recipeHash changes whenever what goes into the initramfs changes, so a
// cached image built by an older harness is never reused.
func recipeHash(busybox string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "recipe-v2\n%+v\n%q\n", guestModules(), busyboxApplets())
	h.Write([]byte(initScript([]string{"x.ko"}, []string{"y.ko"}, nil)))
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return "", fmt.Errorf("read busybox: %w", err)
	}
	h.Write(bb)
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

// downloadDeb fetches pkg=version into dir (kept as a cache: the initramfs
// recipe can change without a new download).
func downloadDeb(ctx context.Context, dir, pkg, version string, logf func(string, ...any)) (string, error) {
	want := filepath.Join(dir, pkg+"_"+strings.ReplaceAll(version, ":", "%3a")+"_amd64.deb")
	if _, err := os.Stat(want); err == nil {
		return want, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cache dir: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, ".download-")
	if err != nil {
		return "", fmt.Errorf("create download dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	logf("vmtest: downloading %s=%s with apt-get download", pkg, version)
	if _, err := runTool(ctx, tmp, "apt-get", "download", "-q", pkg+"="+version); err != nil {
		return "", fmt.Errorf("download kernel package %s=%s (needs the network and Debian apt sources): %w", pkg, version, err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("download kernel package %s: apt-get left %d .deb files", pkg, len(debs))
	}
	if err := os.Rename(debs[0], want); err != nil {
		return "", fmt.Errorf("store kernel package in cache: %w", err)
	}
	return want, nil
}

// buildBootFiles extracts deb under work, resolves module dependencies and
// writes work/out/{vmlinuz,initramfs.cpio,release}.
func buildBootFiles(ctx context.Context, deb, busybox, work string, logf func(string, ...any)) (string, error) {
	root := filepath.Join(work, "root")
	if _, err := runTool(ctx, "", "dpkg-deb", "-x", deb, root); err != nil {
		return "", err
	}
	rels, err := os.ReadDir(filepath.Join(root, "lib", "modules"))
	if err != nil || len(rels) != 1 {
		return "", fmt.Errorf("expected one lib/modules/<release> in the package (err %v)", err)
	}
	release := rels[0].Name()
	if _, err := runTool(ctx, "", "depmod", "-b", root, release); err != nil {
		return "", err
	}
	// Boot modules first so that a dependency shared with the others is
	// loaded in the foreground, before the background loader needs it.
	var bootOrder, otherOrder []string
	seen := map[string]bool{}
	params := map[string]string{}
	mods := guestModules()
	sort.SliceStable(mods, func(i, j int) bool { return mods[i].Boot && !mods[j].Boot })
	for _, m := range mods {
		out, err := runTool(ctx, "", "modprobe", "-d", root, "-S", release, "--show-depends", m.Name)
		if err != nil && m.Optional {
			logf("vmtest: kernel %s has no module %s; tests that need it cannot run on it", release, m.Name)
			continue
		}
		if err != nil {
			return "", fmt.Errorf("resolve module %s: %w", m.Name, err)
		}
		paths, err := parseShowDepends(out)
		if err != nil {
			return "", fmt.Errorf("resolve module %s: %w", m.Name, err)
		}
		for _, p := range paths {
			if seen[p] {
				continue
			}
			seen[p] = true
			if m.Boot {
				bootOrder = append(bootOrder, p)
			} else {
				otherOrder = append(otherOrder, p)
			}
		}
		params[strings.ReplaceAll(m.Name, "-", "_")] = m.Params
	}

	out := filepath.Join(work, "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", err
	}
	kernel := filepath.Join(root, "boot", "vmlinuz-"+release)
	if err := copyFile(kernel, filepath.Join(out, "vmlinuz"), 0o644); err != nil {
		return "", err
	}
	// Optional: an uncompressed kernel boots faster (see extractPVHKernel).
	if err := extractPVHKernel(ctx, kernel, filepath.Join(out, "vmlinux")); err != nil {
		logf("vmtest: no uncompressed PVH kernel, booting the bzImage: %v", err)
	}
	f, err := os.Create(filepath.Join(out, "initramfs.cpio"))
	if err != nil {
		return "", err
	}
	defer f.Close()
	w := newCPIOWriter(f)
	for _, d := range []string{"bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"} {
		w.Dir(d)
	}
	w.CharDev("dev/console", 5, 1)
	w.CopyFile("bin/busybox", 0o755, busybox)
	for _, a := range busyboxApplets() {
		w.Symlink("bin/"+a, "busybox")
	}
	// busybox insmod needs plain .ko files: newer Debian kernels ship
	// their modules compressed, so they are unpacked here.
	plain := func(paths []string) ([]string, error) {
		var names []string
		for _, p := range paths {
			name := filepath.Base(p)
			switch {
			case strings.HasSuffix(p, ".ko"):
				w.CopyFile("lib/modules/"+name, 0o644, p)
			case strings.HasSuffix(p, ".ko.xz"), strings.HasSuffix(p, ".ko.zst"):
				tool := map[bool]string{true: "xz", false: "zstd"}[strings.HasSuffix(p, ".xz")]
				data, err := runTool(ctx, "", tool, "-dc", p)
				if err != nil {
					return nil, fmt.Errorf("unpack module %s: %w", p, err)
				}
				name = strings.TrimSuffix(strings.TrimSuffix(name, ".xz"), ".zst")
				w.File("lib/modules/"+name, 0o644, data)
			default:
				return nil, fmt.Errorf("module %s: want a .ko, .ko.xz or .ko.zst file", p)
			}
			names = append(names, filepath.Join(filepath.Dir(p), name))
		}
		return names, nil
	}
	if bootOrder, err = plain(bootOrder); err != nil {
		return "", err
	}
	if otherOrder, err = plain(otherOrder); err != nil {
		return "", err
	}
	w.File("init", 0o755, []byte(initScript(bootOrder, otherOrder, params)))
	if err := w.Close(); err != nil {
		return "", fmt.Errorf("write initramfs: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write initramfs: %w", err)
	}
	if err := os.WriteFile(filepath.Join(out, "release"), []byte(release), 0o644); err != nil {
		return "", err
	}
	return release, nil
}

// parseShowDepends reads `modprobe --show-depends` output: one
// "insmod /path/x.ko [params]" per module in load order, or "builtin x".
func parseShowDepends(out []byte) ([]string, error) {
	var paths []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 0:
		case f[0] == "builtin" && len(f) == 2:
		case f[0] == "insmod" && len(f) >= 2 && filepath.IsAbs(f[1]):
			paths = append(paths, f[1])
		default:
			return nil, fmt.Errorf("unexpected modprobe --show-depends line %q", sc.Text())
		}
	}
	return paths, sc.Err()
}

// findBusybox locates a statically linked busybox (Debian's busybox-static):
// the initramfs has no C library for a dynamic one.
func findBusybox() (string, error) {
	candidates := []string{"/bin/busybox", "/usr/bin/busybox"}
	if p := os.Getenv("PLOOP_CSI_VM_BUSYBOX"); p != "" {
		candidates = []string{p}
	}
	for _, p := range candidates {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		static := true
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				static = false
			}
		}
		f.Close()
		if static {
			return p, nil
		}
	}
	return "", fmt.Errorf("no statically linked busybox at %s: install busybox-static (see .ci/deps)", strings.Join(candidates, " or "))
}

func copyFile(src, dst string, perm os.FileMode) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	if err := os.WriteFile(dst, data, perm); err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	return nil
}

// runTool runs a host tool and returns its stdout; a failure's error names
// the command and carries the tail of its stderr.
func runTool(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("%s not found in PATH (see .ci/deps): %w", name, err)
		}
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = "..." + msg[len(msg)-2000:]
		}
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return out, nil
}

// extractPVHKernel writes the uncompressed kernel inside bzImage to dst if it
// has a PVH entry point. qemu starts such an ELF directly, without firmware
// real-mode setup or the kernel's self-decompression, which under TCG saves
// several seconds per boot (about 21 s to 14 s to the command on a loaded
// 2-core machine). The payload is found through the x86 boot protocol header.
func extractPVHKernel(ctx context.Context, bzImage, dst string) error {
	img, err := os.ReadFile(bzImage)
	if err != nil {
		return err
	}
	payload, err := bzImagePayload(img)
	if err != nil {
		return fmt.Errorf("%s: %w", bzImage, err)
	}
	var decompress []string
	switch {
	case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
		decompress = []string{"xz", "-dc", "--single-stream"}
	case bytes.HasPrefix(payload, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		decompress = []string{"zstd", "-dcq"}
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		decompress = []string{"gzip", "-dc"}
	default:
		return fmt.Errorf("%s: unknown kernel compression % x", bzImage, payload[:min(len(payload), 6)])
	}
	cmd := exec.CommandContext(ctx, decompress[0], decompress[1:]...)
	cmd.Stdin = bytes.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	vmlinux, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("decompress kernel with %s: %w: %s", decompress[0], err, strings.TrimSpace(stderr.String()))
	}
	if err := checkPVHNote(vmlinux); err != nil {
		return err
	}
	return os.WriteFile(dst, vmlinux, 0o644)
}

// bzImagePayload returns the compressed kernel of a bzImage: it starts
// payload_offset (header field at 0x248) bytes after the real-mode setup,
// which is setup_sects (0x1f1; 0 means 4) + 1 sectors of 512 bytes.
func bzImagePayload(img []byte) ([]byte, error) {
	if len(img) < 0x250 || string(img[0x202:0x206]) != "HdrS" {
		return nil, errors.New("not a bzImage (no HdrS header)")
	}
	setupSects := int(img[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	off := int(binary.LittleEndian.Uint32(img[0x248:]))
	n := int(binary.LittleEndian.Uint32(img[0x24c:]))
	start := (setupSects+1)*512 + off
	if off < 0 || n <= 0 || start < 0 || start > len(img) || n > len(img)-start {
		return nil, fmt.Errorf("payload %d+%d outside the %d-byte image", start, n, len(img))
	}
	return img[start : start+n], nil
}

// checkPVHNote verifies vmlinux is an ELF with XEN_ELFNOTE_PHYS32_ENTRY (18),
// the entry qemu uses to boot an uncompressed kernel.
func checkPVHNote(vmlinux []byte) error {
	f, err := elf.NewFile(bytes.NewReader(vmlinux))
	if err != nil {
		return fmt.Errorf("decompressed kernel: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(p.Open())
		if err != nil {
			return fmt.Errorf("decompressed kernel notes: %w", err)
		}
		for len(notes) >= 12 {
			nameSz := int(binary.LittleEndian.Uint32(notes[0:]))
			descSz := int(binary.LittleEndian.Uint32(notes[4:]))
			typ := binary.LittleEndian.Uint32(notes[8:])
			nameEnd := 12 + (nameSz+3)&^3
			end := nameEnd + (descSz+3)&^3
			if nameSz < 0 || descSz < 0 || end > len(notes) || end < 12 {
				break
			}
			if typ == 18 && nameSz >= 3 && string(notes[12:15]) == "Xen" {
				return nil
			}
			notes = notes[end:]
		}
	}
	return errors.New("decompressed kernel has no PVH entry note")
}

// Prepare downloads and builds what a boot needs into the cache, so that a
// later boot needs no network (the end-to-end cluster runs in a network
// namespace of its own).
func Prepare(ctx context.Context, logf func(string, ...any)) error {
	_, err := prepareBoot(ctx, "", logf)
	return err
}
