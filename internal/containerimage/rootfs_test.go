package containerimage

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseDepends(t *testing.T) {
	tests := []struct {
		name string
		out  string
		want []string
	}{
		{
			name: "plain and pre-depends",
			out:  "e2fsprogs\n  PreDepends: libblkid1\n  Depends: logsave\n  Breaks: e2fsprogs-l10n\n",
			want: []string{"libblkid1", "logsave"},
		},
		{
			name: "first real alternative",
			out:  "x\n |Depends: <virt>\n    p1\n |Depends: real-b\n  Depends: real-c\n  Depends: libc6\n",
			want: []string{"real-b", "libc6"},
		},
		{
			name: "virtual only: its first provider by name",
			out:  "base-files\n  PreDepends: <foo>\n    zfoo\n    afoo\n",
			want: []string{"afoo"},
		},
		{
			name: "real package with providers listed under it",
			out:  "util-linux\n  PreDepends: libsystemd0\n    libelogind0\n  PreDepends: libudev1\n",
			want: []string{"libsystemd0", "libudev1"},
		},
		{
			name: "skipped groups drop every alternative",
			out:  "quota\n |Depends: debconf\n  Depends: <debconf-2.0>\n    cdebconf\n    debconf\n  Depends: lsb-base\n  Depends: libc6\nxfsprogs\n  Depends: <python3:any>\n    python3\n",
			want: []string{"libc6"},
		},
		{
			name: "several packages",
			out:  "a\n  Depends: b\nc\n  Depends: d\n",
			want: []string{"b", "d"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseDepends([]byte(tt.out))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("parseDepends = %q, want %q", got, tt.want)
			}
		})
	}
	if _, err := parseDepends([]byte("a\n  Depends: <nobody>\n")); err == nil {
		t.Error("a virtual dependency nothing provides was accepted")
	}
}

func TestMergeUsrPaths(t *testing.T) {
	tests := []struct {
		orig, target, wantName, wantTarget string
	}{
		{"sbin/mkfs.ext4", "mke2fs", "usr/sbin/mkfs.ext4", "mke2fs"},
		{"lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "usr/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"},
		{"etc/os-release", "../usr/lib/os-release", "etc/os-release", "../usr/lib/os-release"},
		{"lib/x/a.so", "../../usr/lib/x/b.so", "usr/lib/x/a.so", "b.so"},
		{"sbin/foo", "../lib/bar", "usr/sbin/foo", "../lib/bar"},
		{"usr/bin/x", "../../bin/y", "usr/bin/x", "../../bin/y"},
		{"binx/a", "b", "binx/a", "b"},
	}
	for _, tt := range tests {
		t.Run(tt.orig, func(t *testing.T) {
			name := mergeUsr(tt.orig)
			if name != tt.wantName {
				t.Errorf("mergeUsr(%q) = %q, want %q", tt.orig, name, tt.wantName)
			}
			if got := moveSymlink(tt.orig, name, tt.target); got != tt.wantTarget {
				t.Errorf("moveSymlink(%q -> %q) = %q, want %q", tt.orig, tt.target, got, tt.wantTarget)
			}
		})
	}
}

func TestExcluded(t *testing.T) {
	tests := []struct {
		name string
		want bool
	}{
		{"usr/share/doc/e2fsprogs/changelog.Debian.gz", true},
		{"usr/share/doc/e2fsprogs/copyright", false},
		{"usr/share/doc", false},
		{"usr/share/doc/e2fsprogs", false},
		{"usr/share/doc/e2fsprogs/examples", true},
		{"usr/share/doc/e2fsprogs/examples/copyright", true},
		{"usr/share/man", false},
		{"usr/share/man/man8/mke2fs.8.gz", true},
		{"usr/share/locale/de/LC_MESSAGES/e2fsprogs.mo", true},
		{"usr/sbin/mke2fs", false},
		{"etc/mke2fs.conf", false},
	}
	for _, tt := range tests {
		if got := excluded(tt.name); got != tt.want {
			t.Errorf("excluded(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestWriteLayer checks the layer's order and normalisation, and that a
// hard link group's data ends up on its first name whichever name the
// package linked from.
func TestWriteLayer(t *testing.T) {
	mtime := time.Unix(1700000000, 0).UTC()
	files := map[string]*entry{
		"usr":            {hdr: tar.Header{Typeflag: tar.TypeDir, Name: "usr", Mode: 0o755}},
		"usr/sbin":       {hdr: tar.Header{Typeflag: tar.TypeDir, Name: "usr/sbin", Mode: 0o755}},
		"usr/sbin/mke2f": {hdr: tar.Header{Typeflag: tar.TypeReg, Name: "usr/sbin/mke2f", Mode: 0o755, Uname: "root"}, data: []byte("ELF")},
		// sorts before its target
		"usr/sbin/a-link": {hdr: tar.Header{Typeflag: tar.TypeLink, Name: "usr/sbin/a-link", Linkname: "usr/sbin/mke2f"}},
		"usr/sbin/z-link": {hdr: tar.Header{Typeflag: tar.TypeLink, Name: "usr/sbin/z-link", Linkname: "usr/sbin/mke2f"}},
		"usr/sbin/sym":    {hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "usr/sbin/sym", Linkname: "mke2f", Mode: 0o777}},
		"var/local":       {hdr: tar.Header{Typeflag: tar.TypeDir, Name: "var/local", Mode: 0o2775, Gid: 50}},
		"var":             {hdr: tar.Header{Typeflag: tar.TypeDir, Name: "var", Mode: 0o755}},
	}
	data, err := writeLayer(files, mtime)
	if err != nil {
		t.Fatal(err)
	}
	type got struct {
		name     string
		typ      byte
		link     string
		mode     int64
		gid      int
		contents string
	}
	want := []got{
		{"usr/", tar.TypeDir, "", 0o755, 0, ""},
		{"usr/sbin/", tar.TypeDir, "", 0o755, 0, ""},
		{"usr/sbin/a-link", tar.TypeReg, "", 0o755, 0, "ELF"},
		{"usr/sbin/mke2f", tar.TypeLink, "usr/sbin/a-link", 0o755, 0, ""},
		{"usr/sbin/sym", tar.TypeSymlink, "mke2f", 0o777, 0, ""},
		{"usr/sbin/z-link", tar.TypeLink, "usr/sbin/a-link", 0, 0, ""},
		{"var/", tar.TypeDir, "", 0o755, 0, ""},
		{"var/local/", tar.TypeDir, "", 0o2775, 50, ""},
	}
	var have []got
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !h.ModTime.Equal(mtime) || h.Uname != "" || h.Gname != "" || !h.AccessTime.IsZero() {
			t.Errorf("%s: mtime %v, owner names %q/%q, atime %v: want mtime %v, no names, no atime", h.Name, h.ModTime, h.Uname, h.Gname, h.AccessTime, mtime)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		have = append(have, got{h.Name, h.Typeflag, h.Linkname, h.Mode, h.Gid, string(b)})
	}
	if !reflect.DeepEqual(have, want) {
		t.Errorf("layer:\n got %v\nwant %v", have, want)
	}

	delete(files, "var")
	if _, err := writeLayer(files, mtime); err == nil {
		t.Error("a layer without /var, the parent of /var/local, was written")
	}
	files["var"] = &entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "var", Mode: 0o755}}

	again, err := writeLayer(files, mtime)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data, again) {
		t.Error("the same files gave a different layer")
	}
}

// FuzzParseDepends: any apt-cache output is parsed without a panic, and
// every package chosen is a name the output holds.
func FuzzParseDepends(f *testing.F) {
	f.Add("e2fsprogs\n  PreDepends: libblkid1\n  Depends: logsave\n  Breaks: e2fsprogs-l10n\n")
	f.Add("x\n |Depends: <virt>\n    p1\n |Depends: real-b\n  Depends: real-c\n  Depends: libc6\n")
	f.Add(" |Depends: <v>\n")
	f.Fuzz(func(t *testing.T, out string) {
		names, err := parseDepends([]byte(out))
		if err != nil {
			return
		}
		for _, n := range names {
			if n == "" || !strings.Contains(out, n) {
				t.Fatalf("chose %q, which the output does not name", n)
			}
		}
	})
}
