package driver

import (
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/proto"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "4096": 4096, "4096B": 4096, "64K": 64 << 10, "64k": 64 << 10, "64Ki": 64 << 10, "64KiB": 64 << 10,
		"1M": 1 << 20, "1Mi": 1 << 20, "1mib": 1 << 20, "1MB": 1 << 20, "2G": 2 << 30, "1T": 1 << 40, "1P": 1 << 50,
		"8191P": 8191 << 50,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "+1", " 1", "1 ", "1X", "1Mx", "1KiBB", "1.5M", "8192P", "99999999999999999999", "1e6", "0x10"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"1M", "64KiB", "4096", "8191P", "1i", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
		if m, err := parseSize(strconv.FormatInt(n, 10)); err != nil || m != n {
			t.Fatalf("%d does not read back: %d %v", n, m, err)
		}
	})
}

func FuzzParseParams(f *testing.F) {
	f.Add("type", "simfs", "clusterSize", "1M")
	f.Add("discard", "online", "csi.storage.k8s.io/fstype", "xfs")
	f.Add("inodes", "100", "mkfsOptions", "-m 1")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		p, err := parseParams(map[string]string{k1: v1, k2: v2})
		if err != nil {
			return
		}
		if p.typ != catalog.Ploop && p.typ != catalog.Simfs {
			t.Fatalf("type %q accepted", p.typ)
		}
		if !slices.Contains([]string{"", catalog.DiscardPeriodic, catalog.DiscardOnline}, p.discard) ||
			!slices.Contains([]string{"", catalog.FSExt4, catalog.FSXfs}, p.fsType) || p.clusterSize < 0 {
			t.Fatalf("accepted %+v", p)
		}
		for _, k := range []string{k1, k2} {
			switch k {
			case ParamType, ParamClusterSize, ParamMkfsOptions, ParamInodes, ParamDiscard, ParamFSType:
			default:
				if !strings.HasPrefix(k, reservedPrefix) {
					t.Fatalf("unknown key %q accepted", k)
				}
			}
		}
	})
}

// FuzzParseCapability feeds capabilities decoded from arbitrary bytes.
func FuzzParseCapability(f *testing.F) {
	for _, c := range []*csi.VolumeCapability{mountCap(snw, "xfs", "noatime"), blockCap(snw),
		mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, "")} {
		b, err := proto.Marshal(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var c csi.VolumeCapability
		if proto.Unmarshal(b, &c) != nil {
			return
		}
		pc, err := parseCapability(&c)
		if err != nil {
			return
		}
		if !slices.Contains(singleNodeModes, pc.mode) {
			t.Fatalf("mode %v accepted", pc.mode)
		}
		if !slices.Contains([]string{"", catalog.FSExt4, catalog.FSXfs}, pc.fsType) {
			t.Fatalf("fs %q accepted", pc.fsType)
		}
		for _, fl := range pc.mountFlags {
			if fl == "" || strings.ContainsFunc(fl, func(r rune) bool { return r < ' ' || r > '~' }) {
				t.Fatalf("mount flag %q accepted", fl)
			}
		}
	})
}

// rootOnly is the part of Catalog that mountPath uses.
type rootOnly struct{ Catalog }

func (rootOnly) Root() string { return "/var/lib/ploop-csi" }

func FuzzMountPath(f *testing.F) {
	for _, p := range []string{"/var/lib/kubelet/pods/x/mount", "/var/lib/ploop-csi/x", "../x", "/a/../b", "/"} {
		f.Add(p)
	}
	d := &Driver{cfg: Config{Catalog: rootOnly{}, PathPrefixes: []string{"/var/lib/kubelet"}}}
	f.Fuzz(func(t *testing.T, p string) {
		if d.mountPath("p", p) != nil {
			return
		}
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || strings.ContainsRune(p, 0) || len(p) > maxPathLength {
			t.Fatalf("%q accepted", p)
		}
		if !strings.HasPrefix(p, "/var/lib/kubelet/") || strings.HasPrefix(p+"/", "/var/lib/ploop-csi/") {
			t.Fatalf("%q accepted outside the kubelet's directory or inside the root", p)
		}
	})
}
