package containerimage

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// RuntimePackages are the Debian packages whose programs the node plugin
// runs: mkfs.ext4, e2fsck, resize2fs (e2fsprogs); mkfs.xfs, xfs_growfs,
// xfs_admin (xfsprogs); blkid, losetup (util-linux); mount, umount (mount);
// modprobe (kmod); setquota, repquota (quota). base-files lays out the
// directory tree (/tmp with its sticky bit, /etc/os-release). xfs_admin,
// xfs_info, xfs_freeze and fsck.xfs are /bin/sh scripts that call expr,
// dirname, basename and cat: hence dash and coreutils.
var RuntimePackages = []string{"base-files", "dash", "coreutils", "e2fsprogs", "xfsprogs", "util-linux", "mount", "kmod", "quota"}

// Essential are the RuntimePackages every Debian image has already, which
// the Dockerfile need not install.
var Essential = []string{"base-files", "dash", "coreutils"}

// skippedDependencies are dependencies left out of the closure on purpose.
// Maintainer scripts never run in this image (see rootfsLayer), so what
// only they use is dead weight; the rest serves programs the driver never
// runs. A dependency group any of whose alternatives is listed here is
// dropped whole.
var skippedDependencies = map[string]string{
	"python3":             "xfsprogs' only Python program is xfs_scrub_all, a cron job",
	"python3:any":         "xfsprogs' only Python program is xfs_scrub_all, a cron job",
	"debconf":             "quota's maintainer scripts ask questions through it",
	"debconf-2.0":         "quota's maintainer scripts ask questions through it",
	"init-system-helpers": "quota's maintainer scripts register its init script",
	"lsb-base":            "quota's init script, which nothing starts in a container",
	"sysvinit-utils":      "quota's init script, which nothing starts in a container",
	"awk":                 "base-files' maintainer scripts",
	"dpkg":                "dash's maintainer scripts (diversions)",
	"debianutils":         "dash's maintainer scripts (add-shell)",
}

// Package is one Debian binary package at the version apt would install.
type Package struct {
	Name, Version, Architecture string
}

func (p Package) String() string { return p.Name + "=" + p.Version }

// ResolvePackages returns the dependency closure of roots as apt on this
// machine sees it (Depends and Pre-Depends, no Recommends), sorted by name,
// each at its candidate version. For "a | b" it takes the first real
// package, as apt does when nothing is installed yet.
func ResolvePackages(ctx context.Context, roots []string) ([]Package, error) {
	seen := map[string]bool{}
	queue := append([]string(nil), roots...)
	for _, r := range roots {
		seen[r] = true
	}
	for len(queue) > 0 {
		batch := queue
		queue = nil
		out, err := runTool(ctx, "", "apt-cache", append([]string{"depends",
			"--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
			"--no-replaces", "--no-enhances"}, batch...)...)
		if err != nil {
			return nil, fmt.Errorf("resolve dependencies of %s (are apt's lists current? apt-get update): %w", strings.Join(batch, " "), err)
		}
		deps, err := parseDepends(out)
		if err != nil {
			return nil, fmt.Errorf("resolve dependencies of %s: %w", strings.Join(batch, " "), err)
		}
		for _, d := range deps {
			if !seen[d] {
				seen[d] = true
				queue = append(queue, d)
			}
		}
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	return candidateVersions(ctx, names)
}

// parseDepends reads `apt-cache depends` output and returns the package
// chosen for each dependency group. A line starting with " |" is an
// alternative to the dependency on the next line; "<name>" is a virtual
// package, followed by its providers indented by four spaces.
func parseDepends(out []byte) ([]string, error) {
	type alt struct {
		name      string
		virtual   bool
		providers []string
	}
	var chosen []string
	var group []alt
	open := false // the last dependency line ended with "|"
	finish := func() error {
		if len(group) == 0 {
			return nil
		}
		g := group
		group = nil
		for _, a := range g {
			if _, skip := skippedDependencies[a.name]; skip {
				return nil
			}
		}
		for _, a := range g {
			if !a.virtual {
				chosen = append(chosen, a.name)
				return nil
			}
		}
		for _, a := range g {
			if len(a.providers) > 0 {
				sorted := append([]string(nil), a.providers...)
				sort.Strings(sorted)
				chosen = append(chosen, sorted[0])
				return nil
			}
		}
		return fmt.Errorf("no package provides any of %v", g)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
		case !strings.HasPrefix(line, " "): // a package's name: a new listing
			if err := finish(); err != nil {
				return nil, err
			}
			open = false
		case strings.HasPrefix(line, "    "): // a provider of the last virtual alternative
			if p := strings.TrimSpace(line); len(group) > 0 && p != "" {
				g := &group[len(group)-1]
				g.providers = append(g.providers, p)
			}
		default:
			l := strings.TrimSpace(line)
			alternative := strings.HasPrefix(l, "|")
			l = strings.TrimPrefix(l, "|")
			kind, name, ok := strings.Cut(l, ": ")
			if !ok {
				return nil, fmt.Errorf("unexpected apt-cache depends line %q", line)
			}
			if kind != "Depends" && kind != "PreDepends" {
				continue
			}
			if !open {
				if err := finish(); err != nil {
					return nil, err
				}
			}
			a := alt{name: name}
			if strings.HasPrefix(name, "<") && strings.HasSuffix(name, ">") {
				a = alt{name: strings.Trim(name, "<>"), virtual: true}
			}
			if strings.TrimSpace(a.name) == "" {
				return nil, fmt.Errorf("apt-cache depends line %q names no package", line)
			}
			group = append(group, a)
			open = alternative
		}
	}
	if err := finish(); err != nil {
		return nil, err
	}
	return chosen, sc.Err()
}

// candidateVersions looks up the version apt would install of each name.
func candidateVersions(ctx context.Context, names []string) ([]Package, error) {
	out, err := runTool(ctx, "", "apt-cache", append([]string{"show", "--no-all-versions"}, names...)...)
	if err != nil {
		return nil, fmt.Errorf("look up package versions: %w", err)
	}
	byName := map[string]Package{}
	var cur Package
	flush := func() {
		if cur.Name != "" {
			byName[cur.Name] = cur
		}
		cur = Package{}
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			flush()
			continue
		}
		if v, ok := strings.CutPrefix(line, "Package: "); ok {
			cur.Name = v
		} else if v, ok := strings.CutPrefix(line, "Version: "); ok {
			cur.Version = v
		} else if v, ok := strings.CutPrefix(line, "Architecture: "); ok {
			cur.Architecture = v
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read apt-cache show output: %w", err)
	}
	pkgs := make([]Package, 0, len(names))
	for _, n := range names {
		p, ok := byName[n]
		if !ok || p.Version == "" {
			return nil, fmt.Errorf("apt-cache show gave no version of %s", n)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs, nil
}

// DownloadPackages makes sure dir holds each package's .deb, named
// NAME=VERSION_ARCH.deb, downloading the missing ones with one apt-get
// call, and returns their paths in the order of pkgs. A file appears only
// by a rename, so an interrupted download leaves nothing that looks
// complete.
func DownloadPackages(ctx context.Context, dir string, pkgs []Package) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create the package cache: %w", err)
	}
	paths := make([]string, len(pkgs))
	missing := map[string]string{} // NAME=VERSION -> its path in the cache
	var args []string
	for i, p := range pkgs {
		paths[i] = filepath.Join(dir, fmt.Sprintf("%s=%s_%s.deb", p.Name, p.Version, p.Architecture))
		if _, err := os.Stat(paths[i]); err != nil {
			missing[p.String()] = paths[i]
			args = append(args, p.String())
		}
	}
	if len(missing) == 0 {
		return paths, nil
	}
	tmp, err := os.MkdirTemp(dir, ".download-")
	if err != nil {
		return nil, fmt.Errorf("download packages: %w", err)
	}
	defer os.RemoveAll(tmp)
	// apt drops privileges to _apt for downloads, which then cannot
	// write into a root-owned temporary directory.
	if err := os.Chmod(tmp, 0o777); err != nil {
		return nil, fmt.Errorf("download packages: %w", err)
	}
	if _, err := runTool(ctx, tmp, "apt-get", append([]string{"download", "-q"}, args...)...); err != nil {
		return nil, fmt.Errorf("download packages: %w", err)
	}
	debs, err := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if err != nil {
		return nil, fmt.Errorf("download packages: %w", err)
	}
	// apt-get names files with the version's ':' escaped; the package's
	// own control fields say which is which.
	for _, deb := range debs {
		out, err := runTool(ctx, "", "dpkg-deb", "--show", "--showformat=${Package}=${Version}", deb)
		if err != nil {
			return nil, fmt.Errorf("download packages: %w", err)
		}
		dst, ok := missing[strings.TrimSpace(string(out))]
		if !ok {
			return nil, fmt.Errorf("download packages: apt-get gave %s (%s), which was not asked for", filepath.Base(deb), out)
		}
		if err := os.Rename(deb, dst); err != nil {
			return nil, fmt.Errorf("download packages: %w", err)
		}
		delete(missing, strings.TrimSpace(string(out)))
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("download packages: apt-get did not download %d of them: %v", len(missing), missing)
	}
	return paths, nil
}

// runTool runs a program and returns its standard output; the error
// carries what it printed on standard error.
func runTool(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	return runToolEnv(ctx, dir, nil, name, args...)
}

// runToolEnv is runTool with env added to this process's environment.
func runToolEnv(ctx context.Context, dir string, env []string, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), "LC_ALL=C"), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// DefaultCacheDir is where builds keep .deb files: image/ under the
// project's cache, which is the test harness's ($PLOOP_CSI_CACHE, else
// $XDG_CACHE_HOME/ploop-csi, else ~/.cache/ploop-csi, else a per-user
// directory under the temp dir).
func DefaultCacheDir() string {
	base := os.Getenv("PLOOP_CSI_CACHE")
	if base == "" {
		if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
			base = filepath.Join(d, "ploop-csi")
		} else if home, err := os.UserHomeDir(); err == nil {
			base = filepath.Join(home, ".cache", "ploop-csi")
		} else {
			base = filepath.Join(os.TempDir(), fmt.Sprintf("ploop-csi-cache-%d", os.Getuid()))
		}
	}
	return filepath.Join(base, "image")
}
