package simfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseMountinfo(t *testing.T) {
	for _, c := range []struct {
		name string
		line string
		want mountEntry
		bad  bool
	}{
		{name: "root", line: "26 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard",
			want: mountEntry{id: 26, dev: unix.Mkdev(254, 0), root: "/", mountPoint: "/"}},
		{name: "optional fields", line: "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue",
			want: mountEntry{id: 36, dev: unix.Mkdev(98, 0), root: "/mnt1", mountPoint: "/mnt2"}},
		{name: "escapes", line: `40 26 7:3 /a\040b\134c /tmp/x\011y\012z rw - xfs /dev/loop3 rw`,
			want: mountEntry{id: 40, dev: unix.Mkdev(7, 3), root: "/a b\\c", mountPoint: "/tmp/x\ty\nz"}},
		{name: "large minor", line: "41 26 259:1048575 / /data rw - ext4 /dev/nvme0n1p1 rw",
			want: mountEntry{id: 41, dev: unix.Mkdev(259, 1048575), root: "/", mountPoint: "/data"}},
		{name: "pseudo root", line: "50 26 0:4 net:[4026531840] /run/netns/x rw - nsfs nsfs rw",
			want: mountEntry{id: 50, dev: unix.Mkdev(0, 4), root: "net:[4026531840]", mountPoint: "/run/netns/x"}},
		{name: "no separator", line: "26 1 254:0 / / rw,relatime ext4 /dev/vda rw x", bad: true},
		{name: "separator too early", line: "26 1 254:0 / / - ext4 /dev/vda rw a b", bad: true},
		{name: "short", line: "26 1 254:0 / / rw - ext4", bad: true},
		{name: "bad id", line: "x 1 254:0 / / rw - ext4 /dev/vda rw", bad: true},
		{name: "bad device", line: "26 1 254 / / rw - ext4 /dev/vda rw", bad: true},
		{name: "bad major", line: "26 1 -1:0 / / rw - ext4 /dev/vda rw", bad: true},
		{name: "relative mount point", line: "26 1 254:0 / mnt rw - ext4 /dev/vda rw", bad: true},
		{name: "truncated escape", line: `26 1 254:0 /a\04 /mnt rw - ext4 /dev/vda rw`, bad: true},
		{name: "escape out of range", line: `26 1 254:0 /a\777 /mnt rw - ext4 /dev/vda rw`, bad: true},
		{name: "non-octal escape", line: `26 1 254:0 /a\08x /mnt rw - ext4 /dev/vda rw`, bad: true},
		{name: "double space", line: "26  1 254:0 / / rw - ext4 /dev/vda rw", bad: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := parseMountinfo([]byte(c.line + "\n"))
			if c.bad {
				if err == nil {
					t.Fatalf("accepted: %+v", got)
				}
				return
			}
			if err != nil || len(got) != 1 || got[0] != c.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, c.want)
			}
		})
	}
	own, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if ms, err := parseMountinfo(own); err != nil || len(ms) == 0 {
		t.Fatalf("this machine's mountinfo: %d entries, %v", len(ms), err)
	}
}

// escapeMountinfo is the kernel's escaping (fs/proc_namespace.c mangle()).
func escapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case ' ', '\t', '\n', '\\':
			fmt.Fprintf(&b, `\%03o`, c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// FuzzParseMountinfo: the parser never panics; what it accepts has an
// absolute mount point and survives the kernel's escaping unchanged.
func FuzzParseMountinfo(f *testing.F) {
	f.Add([]byte("26 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n36 35 98:0 /mnt1 /mnt2 rw master:1 - ext3 /dev/root rw\n"))
	f.Add([]byte(`40 26 7:3 /a\040b /tmp/x\011y rw - xfs /dev/loop3 rw`))
	f.Add([]byte("50 26 0:4 net:[4026531840] /run/netns/x rw - nsfs nsfs rw"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ms, err := parseMountinfo(data)
		if err != nil {
			return
		}
		for _, m := range ms {
			if !strings.HasPrefix(m.mountPoint, "/") || m.root == "" {
				t.Fatalf("accepted %+v", m)
			}
			line := fmt.Sprintf("%d 1 %d:%d %s %s rw - ext4 src rw", m.id, unix.Major(m.dev), unix.Minor(m.dev),
				escapeMountinfo(m.root), escapeMountinfo(m.mountPoint))
			again, err := parseMountinfo([]byte(line))
			if err != nil || len(again) != 1 || again[0] != m {
				t.Fatalf("round trip of %+v via %q: %+v, %v", m, line, again, err)
			}
		}
	})
}

// TestLockCandidatesOrder: every root of a filesystem, whichever mount it is
// under and whatever order mountinfo lists mounts in, tries the same
// directories in the same order: the filesystem's root first, then the
// shallowest bind mount.
func TestLockCandidatesOrder(t *testing.T) {
	dev := unix.Mkdev(7, 1)
	ms := []mountEntry{
		{id: 90, dev: dev, root: "/var/lib/kubelet", mountPoint: "/var/lib/kubelet"},
		{id: 80, dev: unix.Mkdev(7, 2), root: "/", mountPoint: "/other"},
		{id: 70, dev: dev, root: "/var", mountPoint: "/host-var"},
		{id: 60, dev: dev, root: "/", mountPoint: "/ro-host"},
		{id: 50, dev: dev, root: "/", mountPoint: "/"},
		{id: 40, dev: dev, root: "/abc", mountPoint: "/abc"},
		{id: 30, dev: dev, root: "net:[1]", mountPoint: "/n"},
	}
	want := []uint64{50, 60, 40, 70, 90, 30}
	for i := 0; i < len(ms); i++ {
		rot := append(append([]mountEntry{}, ms[i:]...), ms[:i]...)
		var got []uint64
		for _, m := range lockCandidates(rot, dev) {
			got = append(got, m.id)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("rotation %d: order %v, want %v", i, got, want)
		}
	}
}

// TestOpenMountRoot: on this machine's real mounts, the root of the mount
// holding a temporary directory opens; a wrong mount ID, or a directory
// inside the mount rather than its root, is refused.
func TestOpenMountRoot(t *testing.T) {
	dir := t.TempDir()
	st, err := fstatEntry(openDir(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	ms, err := parseMountinfo(data)
	if err != nil {
		t.Fatal(err)
	}
	var own mountEntry
	for _, m := range ms {
		if m.id == st.mntID {
			own = m
		}
	}
	if own.id == 0 || own.dev != st.dev {
		t.Fatalf("mount %d of %s not in mountinfo (or another device): %+v", st.mntID, dir, own)
	}
	fd, err := openMountRoot(own, st.dev)
	if err != nil {
		t.Fatalf("root of %+v: %v", own, err)
	}
	unix.Close(fd)
	for name, m := range map[string]mountEntry{
		"wrong mount ID": {id: own.id + 100000, dev: own.dev, root: own.root, mountPoint: own.mountPoint},
		"inside a mount": {id: own.id, dev: own.dev, root: own.root, mountPoint: dir},
		"wrong device":   {id: own.id, dev: own.dev + 1, root: own.root, mountPoint: own.mountPoint},
	} {
		fd, err := openMountRoot(m, m.dev)
		if err == nil {
			unix.Close(fd)
			t.Errorf("%s: %+v opened", name, m)
		} else if !errors.Is(err, unix.ESTALE) {
			t.Errorf("%s: %v, want ESTALE", name, err)
		}
	}
}

// TestProjectLockFile: the lock file is made 0600; one that others could
// open, that is not a regular file or that redirects elsewhere is refused.
func TestProjectLockFile(t *testing.T) {
	for _, c := range []struct {
		name    string
		prepare func(t *testing.T, dir string)
		want    error // nil: the lock works
	}{
		{"fresh", func(*testing.T, string) {}, nil},
		{"existing private", func(t *testing.T, dir string) { writeMode(t, filepath.Join(dir, projectLockFile), 0o600) }, nil},
		{"readable by others", func(t *testing.T, dir string) { writeMode(t, filepath.Join(dir, projectLockFile), 0o644) }, unix.EPERM},
		{"symlink", func(t *testing.T, dir string) {
			writeMode(t, filepath.Join(dir, "target"), 0o600)
			if err := os.Symlink("target", filepath.Join(dir, projectLockFile)); err != nil {
				t.Fatal(err)
			}
		}, unix.ELOOP},
		{"fifo", func(t *testing.T, dir string) {
			if err := unix.Mkfifo(filepath.Join(dir, projectLockFile), 0o600); err != nil {
				t.Fatal(err)
			}
		}, unix.EINVAL},
		{"directory", func(t *testing.T, dir string) {
			if err := os.Mkdir(filepath.Join(dir, projectLockFile), 0o700); err != nil {
				t.Fatal(err)
			}
		}, unix.EISDIR},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			c.prepare(t, dir)
			st, err := fstatEntry(openDir(t, dir))
			if err != nil {
				t.Fatal(err)
			}
			l := &projectLock{dev: st.dev, fsRoot: dir}
			unlock, err := l.lock(dir)
			if c.want != nil {
				if err == nil {
					unlock()
				}
				if !errors.Is(err, c.want) {
					t.Fatalf("lock = %v, want %v", err, c.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer unlock()
			fi, err := os.Lstat(filepath.Join(dir, projectLockFile))
			if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
				t.Fatalf("lock file %v, %v", fi, err)
			}
			// Held: another description of the file cannot take it.
			fd, err := unix.Open(filepath.Join(dir, projectLockFile), unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fd)
			if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
				t.Fatalf("second flock while held = %v, want EWOULDBLOCK", err)
			}
			unlock()
			if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
				t.Fatalf("flock after unlock: %v", err)
			}
			unix.Flock(fd, unix.LOCK_UN)
		})
	}
}

func writeMode(t *testing.T, p string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(p, nil, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

// TestSharedFilesystemProjectIDs: two roots on one filesystem (one fake
// quota) creating volumes at the same time never hand out one project ID
// twice, and every volume's ID carries its own limits. The kernel proof is
// TestKernel/SharedFilesystem_*; this one tests the allocation logic.
func TestSharedFilesystemProjectIDs(t *testing.T) {
	rounds, perRoot := 20, 8
	if testing.Short() {
		rounds = 5
	}
	for round := range rounds {
		q := newFakeQuota()
		fs := t.TempDir()
		var roots []*Root
		for _, name := range []string{"a", "b"} {
			dir := filepath.Join(fs, name)
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			roots = append(roots, openFake(t, dir, q))
		}
		var wg sync.WaitGroup
		errs := make(chan error, 2*perRoot)
		for ri, r := range roots {
			for i := range perRoot {
				wg.Go(func() {
					if _, err := r.Create(fmt.Sprintf("v%d", i), uint64(ri+1)<<20, uint64(10*(i+1))); err != nil {
						errs <- err
					}
				})
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		owner := map[uint32]string{}
		for ri, r := range roots {
			vols, err := r.List()
			if err != nil || len(vols) != perRoot {
				t.Fatalf("round %d root %d: %d volumes, %v", round, ri, len(vols), err)
			}
			for _, v := range vols {
				who := fmt.Sprintf("%s/%s", r.Path(), v.ID)
				if other, dup := owner[v.Project]; dup {
					t.Fatalf("round %d: %s and %s share project ID %d", round, other, who, v.Project)
				}
				owner[v.Project] = who
				if got := q.limits[v.Project]; got != [2]uint64{v.Bytes, v.Inodes} {
					t.Fatalf("round %d: %s: quota limits %v, want %d bytes %d inodes", round, who, got, v.Bytes, v.Inodes)
				}
			}
		}
	}
}

// TestRetriedDeleteKeepsOthersLimits: a Delete that fails after removing the
// tree (here: the registry cannot be saved) and is retried later must not
// clear the limits of a volume that another root on the filesystem made in
// between. The ID stays claimed until the registry entry is gone.
func TestRetriedDeleteKeepsOthersLimits(t *testing.T) {
	q := newFakeQuota()
	fs := t.TempDir()
	var roots []*Root
	for _, name := range []string{"a", "b"} {
		dir := filepath.Join(fs, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		roots = append(roots, openFake(t, dir, q))
	}
	a, b := roots[0], roots[1]
	v, err := a.Create("v", 1<<20, 10)
	if err != nil {
		t.Fatal(err)
	}
	// A directory where the registry's temporary file goes makes every
	// registry save of a fail.
	block := filepath.Join(a.Path(), metaDir, registryFile+".tmp")
	if err := os.Mkdir(block, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := a.Delete("v"); err == nil {
		t.Fatal("Delete with an unwritable registry succeeded")
	}
	if err := os.Remove(block); err != nil {
		t.Fatal(err)
	}
	w, err := b.Create("w", 2<<20, 20)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Delete("v"); err != nil {
		t.Fatalf("retried Delete: %v", err)
	}
	if w.Project == v.Project {
		t.Errorf("w got project %d while the interrupted Delete of v still held it", w.Project)
	}
	if got := q.limits[w.Project]; got != [2]uint64{w.Bytes, w.Inodes} {
		t.Errorf("w's limits %v after the retried Delete of v, want %d bytes %d inodes", got, w.Bytes, w.Inodes)
	}
	if _, ok := q.limits[v.Project]; ok && v.Project != w.Project {
		t.Errorf("v's limits survive its Delete")
	}
}
