package simfs

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// describeTree renders every entry under dir (the top included as ".") as one
// line with everything a faithful copy must preserve: type, permission and
// set-id bits, owner, size, content hash, symlink target, xattrs, mtime for
// non-directories, and hard-link groups (by the first path of each inode).
func describeTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	firstPath := map[uint64]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		var b strings.Builder
		fmt.Fprintf(&b, "type=%o perm=%o uid=%d gid=%d", st.Mode&unix.S_IFMT, st.Mode&0o7777, st.Uid, st.Gid)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " size=%d sha=%x mtime=%d", len(data), sha256.Sum256(data), fi.ModTime().UnixNano())
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " target=%q mtime=%d", target, fi.ModTime().UnixNano())
		case unix.S_IFCHR, unix.S_IFBLK:
			fmt.Fprintf(&b, " rdev=%d", st.Rdev)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR && st.Nlink > 1 {
			if first, ok := firstPath[st.Ino]; ok {
				fmt.Fprintf(&b, " hardlink-of=%s", first)
			} else {
				firstPath[st.Ino] = rel
			}
		}
		b.WriteString(" xattrs=" + xattrString(t, p))
		out[rel] = b.String()
		return nil
	})
	if err != nil {
		t.Fatalf("describe %s: %v", dir, err)
	}
	return out
}

func xattrString(t *testing.T, p string) string {
	n, err := unix.Llistxattr(p, nil)
	if err != nil || n == 0 {
		return "{}"
	}
	buf := make([]byte, n)
	n, err = unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var parts []string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		v := make([]byte, 65536)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		parts = append(parts, fmt.Sprintf("%s=%q", name, v[:m]))
	}
	sort.Strings(parts)
	return "{" + strings.Join(parts, ",") + "}"
}

// diffTrees reports the entries that differ between two descriptions.
func diffTrees(want, got map[string]string) []string {
	var diffs []string
	for p, w := range want {
		if g, ok := got[p]; !ok {
			diffs = append(diffs, "missing "+p+": "+w)
		} else if g != w {
			diffs = append(diffs, fmt.Sprintf("%s:\n  want %s\n  got  %s", p, w, g))
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, "extra "+p+": "+g)
		}
	}
	sort.Strings(diffs)
	return diffs
}

// buildRichTree fills dir with every kind of entry the copier must preserve.
func buildRichTree(t *testing.T, dir string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "sub/deeper"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "plain"), []byte("hello"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "sub/deeper/data"), []byte(strings.Repeat("data", 5000)), 0o600))
	must(os.WriteFile(filepath.Join(dir, "setuid"), []byte("#!/bin/sh\n"), 0o755))
	must(os.Chmod(filepath.Join(dir, "setuid"), 0o4755))
	must(os.Chown(filepath.Join(dir, "setuid"), 0, 0))
	must(os.WriteFile(filepath.Join(dir, "owned"), []byte("x"), 0o640))
	must(os.Chown(filepath.Join(dir, "owned"), 1234, 5678))
	must(os.Chown(filepath.Join(dir, "sub"), 4321, 8765))
	must(os.Chmod(filepath.Join(dir, "sub"), 0o2770))
	must(os.Link(filepath.Join(dir, "plain"), filepath.Join(dir, "sub/hardlink")))
	must(os.Symlink("../plain", filepath.Join(dir, "sub/rel-link")))
	must(os.Symlink("/etc/passwd", filepath.Join(dir, "abs-link")))
	must(os.Lchown(filepath.Join(dir, "abs-link"), 99, 98))
	must(unix.Mkfifo(filepath.Join(dir, "fifo"), 0o620))
	must(unix.Mknod(filepath.Join(dir, "null"), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))))
	must(unix.Setxattr(filepath.Join(dir, "plain"), "user.color", []byte("blue"), 0))
	must(unix.Setxattr(filepath.Join(dir, "sub"), "user.dir", []byte{0, 1, 2}, 0))
	must(unix.Setxattr(filepath.Join(dir, "setuid"), "trusted.k", []byte("v"), 0))
	// A sparse file: 1 MiB hole, 4 KiB data, 1 MiB hole.
	f, err := os.Create(filepath.Join(dir, "sparse"))
	must(err)
	_, err = f.WriteAt([]byte(strings.Repeat("s", 4096)), 1<<20)
	must(err)
	must(f.Truncate(2<<20 + 4096))
	must(f.Close())
	must(os.Chtimes(filepath.Join(dir, "plain"), time0, time0))
}

var time0 = time.Unix(1_000_000_000, 123456789)
