package simfs

import (
	"bytes"
	"encoding/csv"
	"errors"
	"fmt"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestKernel proves enforcement, accounting, ID allocation, safe deletion and
// snapshot/restore against the real ext4 and xfs project quota of the VM's
// kernel. Writes that must be limited run as an unprivileged uid.
func TestKernel(t *testing.T) {
	var cases []vmtest.Case
	for _, fstype := range []string{"ext4", "xfs"} {
		for _, c := range []struct {
			name string
			run  func(*testing.T, string)
		}{
			{"Enforcement", testEnforcement},
			{"Isolation", testIsolation},
			{"Restart", testRestart},
			{"SafeDelete", testSafeDelete},
			{"SnapshotRestore", testSnapshotRestore},
			{"SharedFilesystem", testSharedFilesystem},
		} {
			cases = append(cases, vmtest.Case{Name: c.name + "_" + fstype, Run: func(t *testing.T) { c.run(t, fstype) }})
		}
	}
	cases = append(cases, vmtest.Case{Name: "RefuseWithoutQuota", Run: testRefuseWithoutQuota},
		vmtest.Case{Name: "ReadOnlyFilesystemRoot", Run: testReadOnlyFilesystemRoot})
	vmtest.Run(t, vmtest.Options{}, cases)
}

var guestChild childBinary

func nobody() *syscall.Credential {
	return &syscall.Credential{Uid: vmtest.UnprivilegedUID, Gid: vmtest.UnprivilegedGID, NoSetGroups: true}
}

// scratchRoot makes a project-quota filesystem and opens a root in it.
func scratchRoot(t *testing.T, fstype string, opts Options) (*Root, string) {
	t.Helper()
	mnt := vmtest.ScratchFS(t, fstype, 256)
	dir := filepath.Join(mnt, "simfs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if err := r.QuotaEnforced(); err != nil {
		t.Fatalf("scratch %s: %v", fstype, err)
	}
	return r, mnt
}

// reportedUsage asks the quota tools, not our code, what project p uses:
// bytes (from the 1 KiB block count) and inodes.
func reportedUsage(t *testing.T, fstype, mnt string, p uint32) (uint64, uint64) {
	t.Helper()
	testcmd.Combined(t, "sync")
	id := "#" + strconv.FormatUint(uint64(p), 10)
	if fstype == "xfs" {
		out := testcmd.Combined(t, "xfs_quota", "-x", "-c", "report -p -n -b -i -N", mnt)
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			// #ID used soft hard warn [grace] iused isoft ihard warn [grace]
			if len(f) >= 9 && f[0] == id && strings.HasPrefix(f[5], "[") {
				return mustUint(t, f[1]) * 1024, mustUint(t, f[6])
			}
		}
		t.Fatalf("project %d not in xfs_quota report:\n%s", p, out)
	}
	out := testcmd.Combined(t, "repquota", "-P", "-n", "-O", "csv", mnt)
	rows, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil || len(rows) < 1 {
		t.Fatalf("repquota csv: %v\n%s", err, out)
	}
	col := map[string]int{}
	for i, h := range rows[0] {
		col[h] = i
	}
	for _, row := range rows[1:] {
		if row[col["Name"]] == id || row[col["Name"]] == id[1:] {
			return mustUint(t, row[col["BlockUsed"]]) * 1024, mustUint(t, row[col["FileUsed"]])
		}
	}
	t.Fatalf("project %d not in repquota report:\n%s", p, out)
	return 0, 0
}

func mustUint(t *testing.T, s string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("parse %q: %v", s, err)
	}
	return n
}

// treeUsage is what a tree occupies counted from the files themselves:
// allocated bytes and inodes, hard links once.
func treeUsage(t *testing.T, dir string) (uint64, uint64) {
	t.Helper()
	seen := map[uint64]bool{}
	var b, n uint64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if !seen[st.Ino] {
			seen[st.Ino] = true
			b += uint64(st.Blocks) * 512
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b, n
}

// checkUsage: Usage equals the quota tools' report and the tree's own size.
func checkUsage(t *testing.T, r *Root, fstype, mnt, id string) Usage {
	t.Helper()
	v, err := r.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "sync")
	u, err := r.Usage(id)
	if err != nil {
		t.Fatal(err)
	}
	rb, ri := reportedUsage(t, fstype, mnt, v.Project)
	if u.Bytes != rb || u.Inodes != ri {
		t.Errorf("%s: Usage %d bytes %d inodes, quota report %d bytes %d inodes", id, u.Bytes, u.Inodes, rb, ri)
	}
	tb, ti := treeUsage(t, v.Path)
	if u.Bytes != tb || u.Inodes != ti {
		t.Errorf("%s: Usage %d bytes %d inodes, tree %d bytes %d inodes", id, u.Bytes, u.Inodes, tb, ti)
	}
	return u
}

// quotaErrno is how each filesystem reports an exhausted project quota: ext4
// says EDQUOT; xfs says ENOSPC for project (directory tree) quota by design,
// as if the tree were a full filesystem.
func quotaErrno(fstype string) string {
	if fstype == "xfs" {
		return "ENOSPC"
	}
	return "EDQUOT"
}

func testEnforcement(t *testing.T, fstype string) {
	r, mnt := scratchRoot(t, fstype, Options{})
	const limit, inodes = 8 << 20, 64
	// Separate volumes for the byte and the inode limit: on xfs a volume out
	// of blocks cannot create files either (directory blocks).
	vb, err := r.Create("bytes", limit, inodes)
	if err != nil {
		t.Fatal(err)
	}
	vi, err := r.Create("inodes", 8*limit, inodes)
	if err != nil {
		t.Fatal(err)
	}
	bin := guestChild.get(t)
	dirs := []string{vb.Path, vi.Path}
	want := quotaErrno(fstype)
	res := runChildOps(t, bin, nobody(), dirs,
		childOp{Op: "write", Dir: 0, Name: "big", Bytes: 2 * limit},
		childOp{Op: "create", Dir: 1, Name: "f", Count: 2 * inodes})
	if res[0].Errno != want || res[0].Written > limit {
		t.Errorf("writing %d bytes over a %d limit: %+v, want %s by %d", 2*limit, limit, res[0], want, limit)
	}
	if res[1].Errno != want || res[1].Created != inodes-1 { // the volume's directory is one inode
		t.Errorf("creating %d files under a %d inode limit: %+v, want %s after %d", 2*inodes, inodes, res[1], want, inodes-1)
	}
	ub := checkUsage(t, r, fstype, mnt, "bytes")
	if ub.Bytes > limit || ub.Bytes < limit-64<<10 || ub.BytesLimit != limit {
		t.Errorf("at the byte limit: Usage %+v", ub)
	}
	ui := checkUsage(t, r, fstype, mnt, "inodes")
	if ui.Inodes != inodes || ui.InodesLimit != inodes {
		t.Errorf("at the inode limit: Usage %+v", ui)
	}
	t.Logf("%s: wrote %d of %d bytes (%s), created %d files under %d inodes; usage %+v, %+v",
		fstype, res[0].Written, limit, res[0].Errno, res[1].Created, inodes, ub, ui)
	firstWritten := res[0].Written

	// Online expansion: the same writes now succeed.
	for _, id := range []string{"bytes", "inodes"} {
		if _, err := r.Expand(id, 64<<20, 4*inodes); err != nil {
			t.Fatal(err)
		}
	}
	res = runChildOps(t, bin, nobody(), dirs,
		childOp{Op: "write", Dir: 0, Name: "big2", Bytes: 2 * limit},
		childOp{Op: "create", Dir: 1, Name: "g", Count: 2 * inodes})
	for i, r := range res {
		if r.Errno != "" {
			t.Errorf("after Expand, op %d: %+v", i, r)
		}
	}
	ub = checkUsage(t, r, fstype, mnt, "bytes")
	if ub.Bytes < uint64(2*limit+firstWritten) || ub.BytesLimit != 64<<20 || ub.InodesLimit != 4*inodes {
		t.Errorf("after Expand: Usage %+v", ub)
	}
	ui = checkUsage(t, r, fstype, mnt, "inodes")
	if ui.Inodes != 3*inodes || ui.InodesLimit != 4*inodes {
		t.Errorf("after Expand: Usage %+v, want %d inodes", ui, 3*inodes)
	}
}

func testIsolation(t *testing.T, fstype string) {
	r, mnt := scratchRoot(t, fstype, Options{})
	a, err := r.Create("a", 16<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	b, err := r.Create("b", 16<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	bin := guestChild.get(t)
	res := runChildOps(t, bin, nobody(), []string{a.Path, b.Path},
		childOp{Op: "write", Dir: 0, Name: "data", Bytes: 4 << 20},
		childOp{Op: "link", Dir: 0, Name: "data", Dir2: 1, Name2: "link"},
		childOp{Op: "rename", Dir: 0, Name: "data", Dir2: 1, Name2: "moved"},
		childOp{Op: "link", Dir: 0, Name: "data", Dir2: 0, Name2: "samevol"})
	if res[0].Errno != "" {
		t.Fatalf("write: %+v", res[0])
	}
	if res[1].Errno != "EXDEV" || res[2].Errno != "EXDEV" {
		t.Errorf("cross-volume link %+v, rename %+v; want EXDEV", res[1], res[2])
	}
	if res[3].Errno != "" {
		t.Errorf("link inside a volume: %+v", res[3])
	}
	// Root gets EXDEV too: the rule is the filesystem's, not a permission.
	if err := os.Rename(filepath.Join(a.Path, "data"), filepath.Join(b.Path, "moved")); !errors.Is(err, unix.EXDEV) {
		t.Errorf("rename as root: %v, want EXDEV", err)
	}
	ua := checkUsage(t, r, fstype, mnt, "a")
	ub := checkUsage(t, r, fstype, mnt, "b")
	if ua.Bytes < 4<<20 || ub.Bytes >= 1<<20 || ub.Inodes != 1 {
		t.Errorf("usage shared or moved: a %+v, b %+v", ua, ub)
	}
}

// setForeignProject marks a directory outside the root with a project ID the
// way an administrator would, with the filesystem's own tool.
func setForeignProject(t *testing.T, fstype, dir string, p uint32) {
	t.Helper()
	ps := strconv.FormatUint(uint64(p), 10)
	if fstype == "xfs" {
		testcmd.Combined(t, "xfs_io", "-c", "chproj "+ps, dir)
		if out := testcmd.Combined(t, "xfs_io", "-c", "lsproj", dir); !strings.Contains(out, "projid = "+ps) {
			t.Fatalf("xfs_io lsproj: %s", out)
		}
		return
	}
	testcmd.Combined(t, "chattr", "-p", ps, dir)
	if out := testcmd.Combined(t, "lsattr", "-pd", dir); !strings.HasPrefix(strings.TrimSpace(out), ps+" ") {
		t.Fatalf("lsattr -p: %s", out)
	}
}

// projectOf reads a directory's project ID and inherit flag with the
// filesystem's own tool.
func projectOf(t *testing.T, fstype, dir string) (string, bool) {
	t.Helper()
	if fstype == "xfs" {
		proj := testcmd.Combined(t, "xfs_io", "-c", "lsproj", dir)
		attr := testcmd.Combined(t, "xfs_io", "-c", "lsattr", dir)
		return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(proj), "projid =")), strings.Contains(strings.Fields(attr)[0], "P")
	}
	f := strings.Fields(testcmd.Combined(t, "lsattr", "-pd", dir))
	return f[0], strings.Contains(f[1], "P")
}

func testRestart(t *testing.T, fstype string) {
	const first = 5000
	r, mnt := scratchRoot(t, fstype, Options{FirstProjectID: first})
	// Foreign IDs: 5001 on a directory outside the root, 5003 as a bare
	// limit nobody uses yet.
	foreign := filepath.Join(mnt, "foreign")
	if err := os.Mkdir(foreign, 0o755); err != nil {
		t.Fatal(err)
	}
	setForeignProject(t, fstype, foreign, first+1)
	if fstype == "xfs" {
		testcmd.Combined(t, "xfs_quota", "-x", "-c", fmt.Sprintf("limit -p bhard=1m %d", first+3), mnt)
	} else {
		testcmd.Combined(t, "setquota", "-P", strconv.Itoa(first+3), "0", "1024", "0", "0", mnt)
	}

	a, err := r.Create("a", 1<<20, 10)
	if err != nil {
		t.Fatal(err)
	}
	bin := guestChild.get(t)
	// Fresh processes open the same root and allocate.
	create := func(id string) childResult {
		res := runChildOps(t, bin, nil, nil, childOp{Op: "create-volume", Root: r.Path(), Name: id, Bytes: 1 << 20, Count: 10, First: first})
		if res[0].Errno != "" {
			t.Fatalf("create %s in a fresh process: %+v", id, res[0])
		}
		return res[0]
	}
	b := create("b")
	c := create("c")
	if again := create("b"); again.Project != b.Project {
		t.Errorf("idempotent create in a fresh process: project %d, want %d", again.Project, b.Project)
	}
	if err := r.Delete("a"); err != nil {
		t.Fatal(err)
	}
	d := create("d")
	want := []uint32{first, first + 2, first + 4, first + 5}
	got := []uint32{a.Project, b.Project, c.Project, d.Project}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("projects a, b, c, d = %v, want %v (5001, 5003 foreign; 5000 released, not reused)", got, want)
	}
	for _, id := range []string{"b", "c", "d"} {
		v, err := r.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		p, inherit := projectOf(t, fstype, v.Path)
		if p != strconv.FormatUint(uint64(v.Project), 10) || !inherit {
			t.Errorf("%s: the filesystem says project %s inherit %v, want %d inherit", id, p, inherit, v.Project)
		}
	}
	if p, _ := projectOf(t, fstype, foreign); p != strconv.Itoa(first+1) {
		t.Errorf("foreign directory's project changed to %s", p)
	}

	// Processes and goroutines allocating at the same time never collide.
	var lists [][]childOp
	for i := 0; i < 3; i++ {
		var ops []childOp
		for j := 0; j < 4; j++ {
			ops = append(ops, childOp{Op: "create-volume", Root: r.Path(), Name: fmt.Sprintf("p%d-%d", i, j), Bytes: 1 << 20, Count: 10, First: first})
		}
		lists = append(lists, ops)
	}
	var wg sync.WaitGroup
	goErrs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := r.Create(fmt.Sprintf("g%d", i), 1<<20, 10); err != nil {
				goErrs <- err
			}
		}()
	}
	results := runChildrenAtOnce(t, bin, lists...)
	wg.Wait()
	close(goErrs)
	for err := range goErrs {
		t.Error(err)
	}
	owner := map[uint32]string{first + 1: "foreign", first + 3: "foreign limit", first: "deleted a"}
	for i, res := range results {
		for j, c := range res {
			if c.Errno != "" {
				t.Fatalf("child %d create %d: %+v", i, j, c)
			}
		}
	}
	vols, err := r.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 3+12+4 {
		t.Errorf("%d volumes after concurrent creates, want %d", len(vols), 3+12+4)
	}
	for _, v := range vols {
		if other, dup := owner[v.Project]; dup {
			t.Errorf("volume %s got project %d, already %s's", v.ID, v.Project, other)
		}
		owner[v.Project] = v.ID
	}
}

func testSafeDelete(t *testing.T, fstype string) {
	r, mnt := scratchRoot(t, fstype, Options{})
	outside := filepath.Join(mnt, "outside")
	if err := os.MkdirAll(filepath.Join(outside, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "dir", "precious"), []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	before := describeTree(t, outside)
	v, err := r.Create("vol", 16<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{
		"to-dir":  outside,
		"to-file": filepath.Join(outside, "dir", "precious"),
		"to-rel":  "../../../outside/dir",
	} {
		if err := os.Symlink(target, filepath.Join(v.Path, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(v.Path, "sub", "mnt"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A mount inside the volume is refused, never emptied.
	testcmd.Combined(t, "mount", "-t", "tmpfs", "tmpfs", filepath.Join(v.Path, "sub", "mnt"))
	if err := os.WriteFile(filepath.Join(v.Path, "sub", "mnt", "other-fs"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.Delete("vol"); !errors.Is(err, unix.EXDEV) {
		t.Errorf("Delete with a mount inside = %v, want EXDEV", err)
	}
	if _, err := os.Stat(filepath.Join(v.Path, "sub", "mnt", "other-fs")); err != nil {
		t.Errorf("file on the mounted filesystem: %v", err)
	}
	testcmd.Combined(t, "umount", filepath.Join(v.Path, "sub", "mnt"))
	if err := r.Delete("vol"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(v.Path); !os.IsNotExist(err) {
		t.Errorf("volume directory still exists: %v", err)
	}
	if d := diffTrees(before, describeTree(t, outside)); len(d) > 0 {
		t.Fatalf("Delete changed files outside the volume:\n%v", d)
	}
	q, err := r.quota.usage(v.Project)
	if err != nil || q.BytesLimit != 0 || q.InodesLimit != 0 {
		t.Errorf("limits after Delete: %+v, %v", q, err)
	}
	if _, err := r.Get("vol"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete: %v", err)
	}
}

func testSnapshotRestore(t *testing.T, fstype string) {
	r, mnt := scratchRoot(t, fstype, Options{})
	v, err := r.Create("src", 64<<20, 1000)
	if err != nil {
		t.Fatal(err)
	}
	buildRichTree(t, v.Path)
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	if err := os.WriteFile(filepath.Join(v.Path, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	want := describeTree(t, v.Path)
	if _, err := r.Snapshot("snap", "src"); err != nil {
		t.Fatal(err)
	}
	reflink := fstype == "xfs" && strings.Contains(testcmd.Combined(t, "xfs_info", mnt), "reflink=1")
	t.Logf("%s: reflink %v", fstype, reflink)
	if reflink {
		out := testcmd.Combined(t, "filefrag", "-v", filepath.Join(r.Path(), snapshotsDir, "snap", "big"))
		if !strings.Contains(out, "shared") {
			t.Errorf("xfs with reflink: snapshot data not shared:\n%s", out)
		}
	}
	// Change the source after the snapshot, as a user would.
	bin := guestChild.get(t)
	if res := runChildOps(t, bin, nobody(), []string{v.Path}, childOp{Op: "write", Name: "later", Bytes: 1 << 20}); res[0].Errno != "" {
		t.Fatalf("write after snapshot: %+v", res[0])
	}
	if err := os.WriteFile(filepath.Join(v.Path, "plain"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(v.Path, "fifo")); err != nil {
		t.Fatal(err)
	}
	if err := r.Delete("src"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"restored", "restored2"} {
		nv, err := r.Restore(id, 64<<20, 1000, "snap")
		if err != nil {
			t.Fatal(err)
		}
		if d := diffTrees(want, describeTree(t, nv.Path)); len(d) > 0 {
			t.Fatalf("%s differs from the snapshot:\n%s", id, strings.Join(d, "\n"))
		}
		p, inherit := projectOf(t, fstype, nv.Path)
		if p != strconv.FormatUint(uint64(nv.Project), 10) || !inherit {
			t.Errorf("%s: project %s inherit %v, want %d", id, p, inherit, nv.Project)
		}
		u := checkUsage(t, r, fstype, mnt, id)
		if u.Inodes != uint64(len(want))-1 { // the hard link is one inode
			t.Errorf("%s: %d inodes charged, want %d", id, u.Inodes, len(want)-1)
		}
	}
	// The restored volume is a live volume with its own quota.
	nv, _ := r.Get("restored")
	res := runChildOps(t, bin, nobody(), []string{nv.Path}, childOp{Op: "write", Name: "fill", Bytes: 128 << 20})
	if res[0].Errno != quotaErrno(fstype) || res[0].Written > 64<<20 {
		t.Errorf("restored volume: filling it gave %+v, want %s", res[0], quotaErrno(fstype))
	}
}

// testRefuseWithoutQuota: ext4 with project accounting but mounted without
// prjquota, and tmpfs, are refused with ErrQuotaNotEnforced.
func testRefuseWithoutQuota(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	testcmd.Combined(t, "truncate", "-s", "64M", img)
	testcmd.Combined(t, "mkfs.ext4", "-q", "-O", "quota,project", img)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "mount", "-o", "loop", img, mnt)
	defer testcmd.Combined(t, "umount", mnt)
	tmpfs := filepath.Join(dir, "tmpfs")
	if err := os.Mkdir(tmpfs, 0o755); err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "mount", "-t", "tmpfs", "tmpfs", tmpfs)
	defer testcmd.Combined(t, "umount", tmpfs)
	for _, root := range []string{mnt, tmpfs} {
		r, err := Open(root, Options{})
		if err != nil {
			t.Fatal(err)
		}
		err = r.QuotaEnforced()
		t.Logf("%s: %v", root, err)
		if _, cerr := r.Create("v", 1<<20, 10); !errors.Is(cerr, ErrQuotaNotEnforced) || !errors.Is(err, ErrQuotaNotEnforced) {
			t.Errorf("%s: QuotaEnforced %v, Create %v; want ErrQuotaNotEnforced", root, err, cerr)
		}
		r.Close()
	}
}

// testSharedFilesystem: two roots on one filesystem, one reached through the
// filesystem's own mount and one through a bind mount of a subdirectory,
// create volumes at the same time from goroutines (each root its own Root)
// and from child processes, round after round. No two volumes anywhere on
// the filesystem share a project ID: the filesystem's tools show each
// volume directory with its recorded ID, and the quota charges each ID one
// inode (the directory) under that volume's own limits.
func testSharedFilesystem(t *testing.T, fstype string) {
	rounds, workers, perWorker, perChild := 3, 3, 3, 4
	if testing.Short() {
		rounds = 1
	}
	mnt := vmtest.ScratchFS(t, fstype, 256)
	a, sub := filepath.Join(mnt, "a"), filepath.Join(mnt, "sub")
	bind := filepath.Join(t.TempDir(), "bind")
	for _, d := range []string{a, sub, bind} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	testcmd.Combined(t, "mount", "--bind", sub, bind)
	t.Cleanup(func() { testcmd.Combined(t, "umount", bind) })
	paths := []string{a, bind}
	bin := guestChild.get(t)
	want := 0
	for round := range rounds {
		var wg sync.WaitGroup
		errs := make(chan error, len(paths)*workers)
		var lists [][]childOp
		for ri, p := range paths {
			r, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			for w := range workers {
				wg.Go(func() {
					for i := range perWorker {
						// Distinct limits per volume, so a shared ID shows as wrong limits too.
						n := uint64(round*100 + w*10 + i + 1)
						if _, err := r.Create(fmt.Sprintf("r%d-g%d-%d", round, w, i), n<<20, 10*n+uint64(ri)); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			var ops []childOp
			for i := range perChild {
				n := int64(round*100 + 50 + i)
				ops = append(ops, childOp{Op: "create-volume", Root: p, Name: fmt.Sprintf("r%d-c-%d", round, i), Bytes: n << 20, Count: int(10*n) + ri, First: DefaultFirstProjectID})
			}
			lists = append(lists, ops)
			want += workers*perWorker + perChild
		}
		results := runChildrenAtOnce(t, bin, lists...)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		for i, res := range results {
			for j, c := range res {
				if c.Errno != "" {
					t.Fatalf("round %d child %d create %d: %+v", round, i, j, c)
				}
			}
		}
	}

	var vols []Volume
	for _, p := range paths {
		r, err := Open(p, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		l, err := r.List()
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, l...)
	}
	if len(vols) != want {
		t.Fatalf("%d volumes, want %d", len(vols), want)
	}
	owner := map[uint32]string{}
	var dirs []string
	for _, v := range vols {
		if other, dup := owner[v.Project]; dup {
			t.Errorf("%s and %s share project ID %d", other, v.Path, v.Project)
		}
		owner[v.Project] = v.Path
		dirs = append(dirs, v.Path)
	}
	onDisk := projectsOf(t, dirs)
	quota := quotaReport(t, fstype, mnt)
	for _, v := range vols {
		if p := onDisk[v.Path]; p != v.Project {
			t.Errorf("%s: the filesystem says project %d, the registry %d", v.Path, p, v.Project)
		}
		q, ok := quota[v.Project]
		if !ok {
			t.Errorf("%s: project %d not in the quota report", v.Path, v.Project)
			continue
		}
		if q.inodes != 1 || q.bytesLimit != v.Bytes || q.inodesLimit != v.Inodes {
			t.Errorf("%s: project %d has %d inodes under limits of %d bytes, %d inodes; want 1 inode (its directory) under %d bytes, %d inodes",
				v.Path, v.Project, q.inodes, q.bytesLimit, q.inodesLimit, v.Bytes, v.Inodes)
		}
	}
	// The lock is at the filesystem's root for both roots, the one behind the
	// bind mount included.
	fi, err := os.Lstat(filepath.Join(mnt, projectLockFile))
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
		t.Errorf("lock file at the filesystem's root: %v, %v", fi, err)
	}
	if _, err := os.Lstat(filepath.Join(bind, projectLockFile)); !os.IsNotExist(err) {
		t.Errorf("lock file at the bind mount's root: %v", err)
	}
	t.Logf("%s: %d volumes in 2 roots over %d rounds, %d distinct project IDs", fstype, len(vols), rounds, len(owner))

	// A process that sees only the bind mount (a container with a hostPath)
	// falls back to a lock file at the root of what it sees, and its ID still
	// avoids every ID the quota lists.
	cmd := childCommand(t, bin, nil, nil, []childOp{
		{Op: "umount", Root: mnt},
		{Op: "create-volume", Root: bind, Name: "partial", Bytes: 1 << 20, Count: 10, First: DefaultFirstProjectID},
	})
	cmd.SysProcAttr.Unshareflags = syscall.CLONE_NEWNS // Go makes the new namespace's mounts private
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child in its own mount namespace: %v", err)
	}
	res := decodeChildOutput(t, out, 2)
	if res[0].Errno != "" || res[1].Errno != "" {
		t.Fatalf("child in its own mount namespace: %+v", res)
	}
	if other, dup := owner[res[1].Project]; dup {
		t.Errorf("volume made behind the bind mount only got project %d, already %s's", res[1].Project, other)
	}
	if fi, err := os.Lstat(filepath.Join(sub, projectLockFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("fallback lock file at the bind mount's root: %v, %v", fi, err)
	}
}

// projectsOf reads the project IDs of dirs with lsattr (FS_IOC_FSGETXATTR,
// which ext4 and xfs both implement).
func projectsOf(t *testing.T, dirs []string) map[string]uint32 {
	t.Helper()
	out := testcmd.Combined(t, "lsattr", append([]string{"-pd"}, dirs...)...)
	got := map[string]uint32{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			t.Fatalf("lsattr line %q", line)
		}
		got[f[2]] = uint32(mustUint(t, f[0]))
	}
	return got
}

type quotaRow struct{ bytes, inodes, bytesLimit, inodesLimit uint64 }

// quotaReport is every project the quota tools report with usage, keyed by ID.
func quotaReport(t *testing.T, fstype, mnt string) map[uint32]quotaRow {
	t.Helper()
	testcmd.Combined(t, "sync")
	rows := map[uint32]quotaRow{}
	if fstype == "xfs" {
		out := testcmd.Combined(t, "xfs_quota", "-x", "-c", "report -p -n -b -i -N", mnt)
		for _, line := range strings.Split(out, "\n") {
			// #ID used soft hard warn [grace] iused isoft ihard warn [grace]
			f := strings.Fields(line)
			if len(f) >= 9 && strings.HasPrefix(f[0], "#") && strings.HasPrefix(f[5], "[") {
				rows[uint32(mustUint(t, f[0][1:]))] = quotaRow{mustUint(t, f[1]) * 1024, mustUint(t, f[6]), mustUint(t, f[3]) * 1024, mustUint(t, f[8])}
			}
		}
		return rows
	}
	out := testcmd.Combined(t, "repquota", "-P", "-n", "-O", "csv", mnt)
	recs, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil || len(recs) < 1 {
		t.Fatalf("repquota csv: %v\n%s", err, out)
	}
	col := map[string]int{}
	for i, h := range recs[0] {
		col[h] = i
	}
	for _, rec := range recs[1:] {
		rows[uint32(mustUint(t, strings.TrimPrefix(rec[col["Name"]], "#")))] = quotaRow{
			mustUint(t, rec[col["BlockUsed"]]) * 1024, mustUint(t, rec[col["FileUsed"]]),
			mustUint(t, rec[col["BlockHardLimit"]]) * 1024, mustUint(t, rec[col["FileHardLimit"]]),
		}
	}
	return rows
}

// testReadOnlyFilesystemRoot: the filesystem's root is visible only through
// a read-only mount while the simfs root is on a writable bind mount. Without
// a lock file Create fails with EROFS and changes nothing; once the file
// exists (made while the mount was writable) the read-only mount serves.
func testReadOnlyFilesystemRoot(t *testing.T) {
	mnt := vmtest.ScratchFS(t, "ext4", 64)
	sub := filepath.Join(mnt, "sub")
	bind := filepath.Join(t.TempDir(), "bind")
	for _, d := range []string{sub, bind} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	testcmd.Combined(t, "mount", "--bind", sub, bind)
	t.Cleanup(func() { testcmd.Combined(t, "umount", bind) })
	r, err := Open(bind, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	testcmd.Combined(t, "mount", "-o", "remount,bind,ro", mnt)
	if _, err := r.Create("v1", 1<<20, 10); !errors.Is(err, unix.EROFS) {
		t.Fatalf("Create with a read-only filesystem root and no lock file = %v, want EROFS", err)
	} else {
		t.Logf("refused: %v", err)
	}
	if vols, err := r.List(); err != nil || len(vols) != 0 {
		t.Fatalf("after the refused Create: %+v, %v", vols, err)
	}
	testcmd.Combined(t, "mount", "-o", "remount,bind,rw", mnt)
	v1, err := r.Create("v1", 1<<20, 10)
	if err != nil {
		t.Fatal(err)
	}
	testcmd.Combined(t, "mount", "-o", "remount,bind,ro", mnt)
	v2, err := r.Create("v2", 1<<20, 10)
	if err != nil {
		t.Fatalf("Create with a read-only filesystem root and an existing lock file: %v", err)
	}
	if v1.Project == v2.Project {
		t.Fatalf("v1 and v2 share project %d", v1.Project)
	}
	testcmd.Combined(t, "mount", "-o", "remount,bind,rw", mnt) // for ScratchFS's cleanup
}
