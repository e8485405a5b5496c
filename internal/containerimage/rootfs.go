package containerimage

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// entry is one file of a layer, its header already normalised.
type entry struct {
	hdr  tar.Header
	data []byte
	from string // the package it came from, for error messages
}

// mergedDirs are the top-level directories Debian 12 keeps under /usr
// ("merged /usr", as debootstrap and the debian images lay it out): their
// contents go below /usr and the directories themselves become symlinks,
// so /sbin/mkfs.ext4 and /usr/sbin/mkfs.ext4 are the same file, as in the
// image the Dockerfile builds.
var mergedDirs = []string{"bin", "sbin", "lib", "lib64"}

// excluded tells the paths left out as the slim Debian images leave them
// out: documentation, manual pages, translations. Each package's
// copyright file stays, with its directory.
func excluded(name string) bool {
	if rest, ok := strings.CutPrefix(name, "usr/share/doc/"); ok {
		pkg, file, nested := strings.Cut(rest, "/")
		return pkg != "" && nested && file != "copyright"
	}
	for _, p := range []string{"usr/share/man/", "usr/share/info/", "usr/share/locale/", "usr/share/lintian/", "usr/share/bug/"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// mergeUsr maps a path of a package onto the merged-/usr layout.
func mergeUsr(name string) string {
	for _, d := range mergedDirs {
		if name == d || strings.HasPrefix(name, d+"/") {
			return "usr/" + name
		}
	}
	return name
}

// moveSymlink returns the target a relative symlink needs once it moves
// from orig to name, so that it still names the same file in the merged
// layout ("../lib/x" from sbin/ is "../lib/x" from usr/sbin/ too, but
// "../usr/lib/x" from lib/ must become "../lib/x" from usr/lib/).
// Absolute targets resolve inside the container's root as they are.
func moveSymlink(orig, name, target string) string {
	if path.IsAbs(target) || orig == name {
		return target
	}
	resolved := path.Join(path.Dir(orig), target)
	if resolved == ".." || strings.HasPrefix(resolved, "../") {
		return target // leaves the tree; the kernel stops at / anyway
	}
	rel, err := filepath.Rel(path.Dir(name), mergeUsr(resolved))
	if err != nil {
		return target
	}
	return filepath.ToSlash(rel)
}

// rootfsLayer unpacks the .deb files into one layer's tar: the packages'
// files as dpkg would install them, without running any maintainer script.
// That means: no /etc/passwd or /etc/group (base-passwd's postinst writes
// them; the binaries layer has its own), no ld.so.cache (glibc finds the
// libraries in its default multiarch directories without it), no
// update-alternatives links (none of the programs the driver runs is one),
// and no dpkg database (nothing installs packages into the image). The
// links that debootstrap would add (merged /usr, /etc/mtab) are added here.
func rootfsLayer(ctx context.Context, debs []string, mtime time.Time) ([]byte, error) {
	files := map[string]*entry{}
	for _, deb := range debs {
		if err := addDeb(ctx, files, deb, mtime); err != nil {
			return nil, err
		}
	}
	for _, d := range mergedDirs {
		if e, ok := files[d]; ok {
			return nil, fmt.Errorf("%s from %s is in the way of the merged-/usr link", d, e.from)
		}
		files[d] = &entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: d, Linkname: "usr/" + d, Mode: 0o777}, from: "merged /usr"}
	}
	// debootstrap makes this link; libext2fs reads it (resize2fs, e2fsck
	// refuse to work without a mount table).
	if e, ok := files["etc/mtab"]; ok {
		return nil, fmt.Errorf("/etc/mtab from %s is in the way of the link to the kernel's mount table", e.from)
	}
	files["etc/mtab"] = &entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/mtab", Linkname: "../proc/self/mounts", Mode: 0o777}, from: "debootstrap"}
	return writeLayer(files, mtime)
}

// addDeb adds a package's files to files. The same directory may come from
// many packages; any other path must come from one package only, or be
// byte-for-byte the same.
func addDeb(ctx context.Context, files map[string]*entry, deb string, mtime time.Time) error {
	// dpkg-deb undoes whichever compression the package uses (xz, zstd,
	// gzip) and streams the plain tar.
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", deb)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("unpack %s: %w: %s", deb, err, strings.TrimSpace(stderr.String()))
	}
	pkg := path.Base(deb)
	tr := tar.NewReader(bytes.NewReader(out))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("unpack %s: %w", deb, err)
		}
		orig := strings.TrimSuffix(path.Clean(strings.TrimPrefix(h.Name, "./")), "/")
		name := mergeUsr(orig)
		if name == "." || excluded(name) {
			continue
		}
		e := &entry{from: pkg, hdr: tar.Header{
			Name: name, Typeflag: h.Typeflag, Mode: h.Mode,
			// Numeric owners as the package has them (root, a few
			// setgid programs' groups); names would be looked up in an
			// /etc/group the runtime never reads.
			Uid: h.Uid, Gid: h.Gid,
		}}
		switch h.Typeflag {
		case tar.TypeDir:
		case tar.TypeReg:
			if e.data, err = io.ReadAll(tr); err != nil {
				return fmt.Errorf("unpack %s: %s: %w", deb, h.Name, err)
			}
		case tar.TypeSymlink:
			e.hdr.Linkname = moveSymlink(orig, name, h.Linkname)
		case tar.TypeLink:
			e.hdr.Linkname = mergeUsr(strings.TrimPrefix(path.Clean(strings.TrimPrefix(h.Linkname, "./")), "/"))
		default:
			return fmt.Errorf("unpack %s: %s has tar type %q, which a package should not ship", deb, h.Name, h.Typeflag)
		}
		if prev, ok := files[name]; ok {
			if prev.hdr.Typeflag == tar.TypeDir && h.Typeflag == tar.TypeDir {
				continue
			}
			if prev.hdr.Typeflag != e.hdr.Typeflag || prev.hdr.Linkname != e.hdr.Linkname || !bytes.Equal(prev.data, e.data) {
				return fmt.Errorf("/%s is in both %s and %s", name, prev.from, pkg)
			}
			continue
		}
		files[name] = e
	}
}

// writeLayer writes files as a tar in path order (parents before children),
// every entry with the same mtime, no owner names, no access or change
// times, so the same files give the same bytes. Hard links point at the
// first of their group in that order, whichever name the package used.
func writeLayer(files map[string]*entry, mtime time.Time) ([]byte, error) {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)

	// Resolve each hard link to the regular file it names, then let the
	// first name of each group carry the data.
	canon := map[string]string{} // target -> first name in order
	linked := map[string]bool{}  // regular files some hard link names
	for _, n := range names {
		e := files[n]
		if e.hdr.Typeflag != tar.TypeLink {
			continue
		}
		linked[e.hdr.Linkname] = true
		t, ok := files[e.hdr.Linkname]
		if !ok || t.hdr.Typeflag != tar.TypeReg {
			return nil, fmt.Errorf("hard link /%s (from %s) names /%s, which is no regular file", n, e.from, e.hdr.Linkname)
		}
		e.data = t.data
	}
	for _, n := range names {
		e := files[n]
		target := n
		if e.hdr.Typeflag == tar.TypeLink {
			target = e.hdr.Linkname
		}
		if _, ok := canon[target]; !ok && (e.hdr.Typeflag == tar.TypeLink || linked[n]) {
			canon[target] = n
		}
	}

	// A runtime would make a missing parent directory up with its own
	// mode and time; say so here instead.
	for _, n := range names {
		if dir := path.Dir(n); dir != "." {
			if p, ok := files[dir]; !ok || p.hdr.Typeflag != tar.TypeDir {
				return nil, fmt.Errorf("/%s (from %s) has no parent directory in the layer", n, files[n].from)
			}
		}
	}

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := files[n]
		h := e.hdr
		h.ModTime, h.AccessTime, h.ChangeTime = mtime, time.Time{}, time.Time{}
		h.Uname, h.Gname = "", ""
		data := e.data
		target := n
		if h.Typeflag == tar.TypeLink {
			target = h.Linkname
		}
		if first, ok := canon[target]; ok {
			if first == n {
				h.Typeflag, h.Linkname = tar.TypeReg, ""
				if e.hdr.Typeflag == tar.TypeLink { // the group's data and mode live on the target
					h.Mode = files[target].hdr.Mode
				}
			} else {
				h.Typeflag, h.Linkname, data = tar.TypeLink, first, nil
			}
		}
		if h.Typeflag == tar.TypeDir {
			h.Name += "/"
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, fmt.Errorf("write /%s: %w", n, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("write /%s: %w", n, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close layer: %w", err)
	}
	return buf.Bytes(), nil
}
