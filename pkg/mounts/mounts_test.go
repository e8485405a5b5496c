package mounts

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"unsafe"
)

// mkfsImage makes an ext4 filesystem in a regular file (no device, no
// mount: mke2fs works on files) and returns the superblock it wrote.
func mkfsImage(t *testing.T, sizeMiB int, args ...string) (string, Ext4Super) {
	t.Helper()
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Fatalf("mkfs.ext4 is needed (e2fsprogs in .ci/deps): %v", err)
	}
	img := filepath.Join(t.TempDir(), "fs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(sizeMiB) << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	cmd := append([]string{"-q", "-F"}, args...)
	if out, err := exec.Command("mkfs.ext4", append(cmd, img)...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return img, readSuper(t, img)
}

func readSuper(t *testing.T, img string) Ext4Super {
	t.Helper()
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := ParseExt4Super(b[ext4SuperOffset : ext4SuperOffset+ext4SuperSize])
	if err != nil {
		t.Fatal(err)
	}
	return sb
}

// TestExt4Super reads the size of filesystems mke2fs made, in the block
// sizes and feature sets that change the superblock's layout, and after
// an offline resize2fs.
func TestExt4Super(t *testing.T) {
	for _, tc := range []struct {
		name string
		mib  int
		args []string
		bs   int64
	}{
		{"default", 64, []string{"-b", "4096"}, 4096},
		{"1k-blocks", 32, []string{"-b", "1024"}, 1024},
		{"64bit", 64, []string{"-b", "4096", "-O", "64bit"}, 4096},
		{"no-64bit", 64, []string{"-b", "4096", "-O", "^64bit,^resize_inode", "-I", "128"}, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, sb := mkfsImage(t, tc.mib, tc.args...)
			if sb.BlockSize != tc.bs || sb.Bytes() != int64(tc.mib)<<20 {
				t.Fatalf("superblock says %d blocks of %d, want %d MiB in %d-byte blocks", sb.Blocks, sb.BlockSize, tc.mib, tc.bs)
			}
			if s := sb.GrowSlack(); s <= 0 || s > 8<<20 {
				t.Fatalf("grow slack %d", s)
			}
			if err := os.Truncate(img, int64(2*tc.mib)<<20); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("resize2fs", img).CombinedOutput(); err != nil {
				t.Fatalf("resize2fs: %v\n%s", err, out)
			}
			got := readSuper(t, img).Bytes()
			if want := int64(2*tc.mib) << 20; got > want || got < want-sb.GrowSlack() {
				t.Fatalf("after resize2fs to %d the superblock says %d", want, got)
			}
		})
	}
}

func TestParseExt4SuperRefuses(t *testing.T) {
	b := make([]byte, ext4SuperSize)
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"short", b[:100]},
		{"zero", b},
		{"huge block size", func() []byte {
			c := append([]byte(nil), b...)
			c[0x38], c[0x39] = 0x53, 0xEF
			c[0x18] = 9
			return c
		}()},
		{"no blocks per group", func() []byte {
			c := append([]byte(nil), b...)
			c[0x38], c[0x39] = 0x53, 0xEF
			c[0x04] = 1
			return c
		}()},
	} {
		if _, err := ParseExt4Super(tc.b); err == nil {
			t.Errorf("%s: parsed", tc.name)
		}
	}
}

func FuzzParseExt4Super(f *testing.F) {
	f.Add(make([]byte, ext4SuperSize))
	sb := make([]byte, ext4SuperSize)
	sb[0x38], sb[0x39] = 0x53, 0xEF
	sb[0x04], sb[0x20], sb[0x28], sb[0x58], sb[0x4C] = 0x10, 0x80, 0x20, 0x80, 1
	f.Add(sb)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseExt4Super(b)
		if err != nil {
			return
		}
		if s.BlockSize < 1024 || s.BlockSize > 65536 || s.Bytes() <= 0 || s.GrowSlack() <= 0 {
			t.Fatalf("accepted an inconsistent superblock: %+v", s)
		}
	})
}

func TestParseCount(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0\n", 0, true},
		{"17\n", 17, true},
		{"17", 17, true},
		{"", 0, false},
		{"-1\n", 0, false},
		{"x\n", 0, false},
		{"1 2\n", 0, false},
	} {
		got, err := ParseCount([]byte(tc.in))
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseCount(%q) = %d, %v", tc.in, got, err)
		}
	}
}

func FuzzParseCount(f *testing.F) {
	f.Add([]byte("3\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if n, err := ParseCount(b); err == nil && n < 0 {
			t.Fatalf("negative count %d from %q", n, b)
		}
	})
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:           "/plain",
		`/a\040b`:          "/a b",
		`/tab\011x\134y`:   "/tab\tx\\y",
		`/trailing\04`:     `/trailing\04`,
		`/not\999octal`:    `/not\999octal`,
		`/deleted\040(de)`: "/deleted (de)",
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescape %q = %q, want %q", in, got, want)
		}
	}
}

// TestIoctlNumbers pins the ioctl requests to the values in the kernel
// headers: a wrong size in a struct silently changes the number.
func TestIoctlNumbers(t *testing.T) {
	if n := unsafe.Sizeof(xfsGeomV1{}); n != 112 {
		t.Fatalf("struct xfs_fsop_geom_v1 is %d bytes, want 112", n)
	}
	if xfsIocFSGeometryV1 != 0x80705864 {
		t.Fatalf("XFS_IOC_FSGEOMETRY_V1 = %#x", xfsIocFSGeometryV1)
	}
	if n := unsafe.Sizeof(fstrimRange{}); n != 24 {
		t.Fatalf("struct fstrim_range is %d bytes", n)
	}
}

func TestCheckOptions(t *testing.T) {
	for _, tc := range []struct {
		opts []string
		ok   bool
	}{
		{nil, true},
		{[]string{"noatime", "discard", "data=ordered"}, true},
		{[]string{""}, false},
		{[]string{"a\x00b"}, false},
		{[]string{"a\nb"}, false},
	} {
		if err := CheckOptions("opt", tc.opts); (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrInvalid)) {
			t.Errorf("CheckOptions(%q) = %v", tc.opts, err)
		}
	}
}

func TestStat(t *testing.T) {
	st, err := Stat(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if st.TotalBytes <= 0 || st.FreeBytes > st.TotalBytes || st.AvailableBytes > st.FreeBytes || st.UsedBytes() < 0 {
		t.Fatalf("implausible statfs: %+v", st)
	}
	if _, err := Stat(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Stat of a missing path: %v", err)
	}
}

// TestFormatRefusesBeforeRunning: bad arguments fail before any tool runs
// (no device is needed to tell).
func TestFormatRefusesBeforeRunning(t *testing.T) {
	m := New(testLogger(t))
	dir := t.TempDir()
	for _, tc := range []struct {
		fstype string
		mkfs   []string
		mount  []string
	}{
		{"btrfs", nil, nil},
		{"", nil, nil},
		{"ext4", []string{""}, nil},
		{"xfs", nil, []string{"a\nb"}},
	} {
		target := filepath.Join(dir, "t")
		if err := m.FormatAndMount("/dev/null", target, tc.fstype, tc.mkfs, tc.mount); !errors.Is(err, ErrInvalid) {
			t.Errorf("FormatAndMount(%q, %q, %q) = %v", tc.fstype, tc.mkfs, tc.mount, err)
		}
		if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("refused FormatAndMount made the target: %v", err)
		}
	}
}

// TestUnmountGone: a target that is not there, or not a mount point,
// unmounts successfully (the second is removed, as CleanupMountPoint does).
func TestUnmountGone(t *testing.T) {
	m := New(testLogger(t))
	dir := t.TempDir()
	if err := m.Unmount(filepath.Join(dir, "missing")); err != nil {
		t.Fatalf("Unmount of a missing target: %v", err)
	}
	plain := filepath.Join(dir, "plain")
	if err := os.Mkdir(plain, 0o755); err != nil {
		t.Fatal(err)
	}
	if mounted, err := m.IsMountPoint(plain); err != nil || mounted {
		t.Fatalf("IsMountPoint(plain dir) = %t, %v", mounted, err)
	}
	if err := m.Unmount(plain); err != nil {
		t.Fatalf("Unmount of a plain directory: %v", err)
	}
	if _, err := os.Stat(plain); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("plain directory not removed: %v", err)
	}
	if _, ok, err := Mounted(plain); ok || err != nil {
		t.Fatalf("Mounted(gone) = %t, %v", ok, err)
	}
}
