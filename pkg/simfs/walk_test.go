package simfs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func openDir(t *testing.T, p string) int {
	t.Helper()
	fd, err := unix.Open(p, openDirFlags, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// TestRemoveTreeDoesNotFollowSymlinks: symlinks to a directory and to a file
// outside the tree, and a symlink at the top, are removed as links; what they
// point at is untouched.
func TestRemoveTreeDoesNotFollowSymlinks(t *testing.T) {
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	if err := os.MkdirAll(filepath.Join(outside, "keep-dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "keep-file"), []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	outsideBefore := describeTree(t, outside)

	parent := filepath.Join(base, "volumes")
	vol := filepath.Join(parent, "vol")
	buildRichTree(t, vol)
	for name, target := range map[string]string{
		"link-to-dir":           outside,
		"sub/link-to-file":      filepath.Join(outside, "keep-file"),
		"sub/deeper/link-to-up": "../../..",
		"link-to-dir-rel":       "../../outside/keep-dir",
	} {
		if err := os.Symlink(target, filepath.Join(vol, name)); err != nil {
			t.Fatal(err)
		}
	}
	// A read-only directory must still be emptied (root ignores modes).
	if err := os.Chmod(filepath.Join(vol, "sub/deeper"), 0o500); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(parent, "toplink")); err != nil {
		t.Fatal(err)
	}

	pfd := openDir(t, parent)
	for _, name := range []string{"vol", "toplink", "vol" /* again: idempotent */, "never-existed"} {
		if err := removeTree(pfd, name); err != nil {
			t.Fatalf("removeTree(%s): %v", name, err)
		}
		if _, err := os.Lstat(filepath.Join(parent, name)); !os.IsNotExist(err) {
			t.Fatalf("%s still exists: %v", name, err)
		}
	}
	if d := diffTrees(outsideBefore, describeTree(t, outside)); len(d) > 0 {
		t.Fatalf("outside tree changed: %v", d)
	}
}

// TestOpenDirAtRefusesSymlinkAndSwap: the directory opener used by the walks
// refuses a symlink and an entry that is not the one stat'ed.
func TestOpenDirAtRefusesSymlinkAndSwap(t *testing.T) {
	base := t.TempDir()
	for _, d := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("a", filepath.Join(base, "l")); err != nil {
		t.Fatal(err)
	}
	fd := openDir(t, base)
	stA, err := statEntry(fd, "a", 0)
	if err != nil {
		t.Fatal(err)
	}
	stL, err := statEntry(fd, "l", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := openDirAt(fd, "l", stL); !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("openDirAt(symlink) = %v, want ELOOP/ENOTDIR", err)
	}
	if _, err := openDirAt(fd, "b", stA); !errors.Is(err, unix.EAGAIN) {
		t.Errorf("openDirAt(swapped) = %v, want EAGAIN", err)
	}
	f, err := openDirAt(fd, "a", stA)
	if err != nil {
		t.Fatalf("openDirAt(a) = %v", err)
	}
	f.Close()
}

// TestCopyTree: a copy is indistinguishable from the source (owners, modes,
// set-id bits, xattrs incl. trusted.*, times, symlinks, hard links, fifos,
// sparse files), it stays sparse, and its usage is counted once per inode.
func TestCopyTree(t *testing.T) {
	base := t.TempDir()
	src := filepath.Join(base, "src")
	buildRichTree(t, src)
	if err := os.Chown(src, 777, 778); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(src, 0o751); err != nil {
		t.Fatal(err)
	}
	want := describeTree(t, src)

	bfd := openDir(t, base)
	stats, _, err := copyTree(bfd, "src", bfd, "dst")
	if err != nil {
		t.Fatal(err)
	}
	if d := diffTrees(want, describeTree(t, filepath.Join(base, "dst"))); len(d) > 0 {
		t.Fatalf("copy differs:\n%v", d)
	}
	// ., sub, sub/deeper, 5 files (plain and its hard link once), 2 symlinks, fifo, device.
	if stats.Inodes != 12 {
		t.Errorf("copied %d inodes, want 12", stats.Inodes)
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(base, "dst/sparse"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > 64<<10 {
		t.Errorf("sparse file copy allocates %d bytes, want a sparse copy", st.Blocks*512)
	}
	// Into an existing empty directory (a restore target).
	if err := os.Mkdir(filepath.Join(base, "existing"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, _, err := copyTree(bfd, "dst", bfd, "existing"); err != nil {
		t.Fatal(err)
	}
	if d := diffTrees(want, describeTree(t, filepath.Join(base, "existing"))); len(d) > 0 {
		t.Fatalf("copy into existing directory differs:\n%v", d)
	}
	// A symlink as the source top is refused, not followed.
	if err := os.Symlink("src", filepath.Join(base, "srclink")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := copyTree(bfd, "srclink", bfd, "dst2"); !errors.Is(err, unix.ENOTDIR) {
		t.Fatalf("copyTree(symlink) = %v, want ENOTDIR", err)
	}
}

// TestDeepTree: the walks resolve one name at a time, so a tree deeper than
// PATH_MAX (as a volume's user may make) is copied and removed.
func TestDeepTree(t *testing.T) {
	base := t.TempDir()
	bfd := openDir(t, base)
	const depth = 1500 // "ddd/" × 1500 = 6000 bytes of path, beyond PATH_MAX
	if err := unix.Mkdirat(bfd, "top", 0o755); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Openat(bfd, "top", openDirFlags, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < depth; i++ {
		if err := unix.Mkdirat(fd, "ddd", 0o755); err != nil {
			t.Fatal(err)
		}
		next, err := unix.Openat(fd, "ddd", openDirFlags, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd = next
	}
	leaf, err := unix.Openat(fd, "leaf", unix.O_WRONLY|unix.O_CREAT, 0o644)
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(leaf)
	stats, _, err := copyTree(bfd, "top", bfd, "copy")
	if err != nil {
		t.Fatal(err)
	}
	if stats.Inodes != depth+2 {
		t.Errorf("copied %d inodes, want %d", stats.Inodes, depth+2)
	}
	for _, name := range []string{"top", "copy"} {
		if err := removeTree(bfd, name); err != nil {
			t.Fatal(err)
		}
	}
	names, err := readNames(bfd)
	if err != nil || len(names) != 0 {
		t.Fatalf("left behind: %v, %v", names, err)
	}
}
