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
)

func openFake(t *testing.T, dir string, q *fakeQuota) *Root {
	t.Helper()
	if q.fsRoot == "" {
		q.fsRoot = t.TempDir()
	}
	r, err := open(dir, Options{FirstProjectID: 1000}, q, q.fsRoot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestOpenValidatesPath(t *testing.T) {
	dir := t.TempDir()
	if err := os.Symlink(dir, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"", "relative", dir + "/", dir + "/../" + filepath.Base(dir), dir + "/link", dir + "/file", dir + "/missing"} {
		if r, err := open(p, Options{}, newFakeQuota(), ""); err == nil {
			r.Close()
			t.Errorf("Open(%q) succeeded", p)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "missing")); !os.IsNotExist(err) {
		t.Errorf("Open of a missing root created it")
	}
}

func TestCreateIdempotentAndConflicts(t *testing.T) {
	dir := t.TempDir()
	q := newFakeQuota()
	r := openFake(t, dir, q)
	v, err := r.Create("pvc-1", 10<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	if v.Project != 1000 || v.Bytes != 10<<20 || v.Path != filepath.Join(dir, "volumes/pvc-1") {
		t.Fatalf("created %+v", v)
	}
	fi, err := os.Stat(v.Path)
	if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o777 {
		t.Fatalf("volume directory %v, %v", fi, err)
	}
	if q.limits[1000] != [2]uint64{10 << 20, 100} {
		t.Fatalf("limits %v", q.limits)
	}
	again, err := r.Create("pvc-1", 10<<20, 100)
	if err != nil || !reflect.DeepEqual(again, v) {
		t.Fatalf("repeated Create = %+v, %v; want %+v", again, err, v)
	}
	for _, size := range [][2]uint64{{20 << 20, 100}, {10 << 20, 101}} {
		if _, err := r.Create("pvc-1", size[0], size[1]); !errors.Is(err, ErrExists) {
			t.Errorf("Create with other size %v = %v, want ErrExists", size, err)
		}
	}
	v2, err := r.Create("pvc-2", 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if v2.Project == v.Project || v2.Bytes != 4096 {
		t.Fatalf("second volume %+v", v2)
	}
	list, err := r.List()
	if err != nil || len(list) != 2 || list[0].ID != "pvc-1" || list[1].ID != "pvc-2" {
		t.Fatalf("List = %+v, %v", list, err)
	}
	c, err := r.Capacity()
	if err != nil || c.ProvisionedBytes != 10<<20+4096 || c.Volumes != 2 || c.TotalBytes == 0 || c.AvailableBytes > c.TotalBytes {
		t.Fatalf("Capacity = %+v, %v", c, err)
	}
}

func TestExpand(t *testing.T) {
	q := newFakeQuota()
	r := openFake(t, t.TempDir(), q)
	v, err := r.Create("v", 1<<20, 10)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Expand("v", 1<<19, 0); !errors.Is(err, ErrConflict) {
		t.Errorf("shrink bytes = %v, want ErrConflict", err)
	}
	if _, err := r.Expand("v", 1<<20, 5); !errors.Is(err, ErrConflict) {
		t.Errorf("shrink inodes = %v, want ErrConflict", err)
	}
	e, err := r.Expand("v", 2<<20, 0)
	if err != nil || e.Bytes != 2<<20 || e.Inodes != 10 {
		t.Fatalf("Expand = %+v, %v", e, err)
	}
	if _, err := r.Expand("v", 2<<20, 0); err != nil {
		t.Fatalf("repeated Expand: %v", err)
	}
	if q.limits[v.Project] != [2]uint64{2 << 20, 10} {
		t.Fatalf("limits %v", q.limits[v.Project])
	}
	if _, err := r.Expand("nope", 2<<20, 0); !errors.Is(err, ErrNotFound) {
		t.Errorf("Expand(missing) = %v, want ErrNotFound", err)
	}
	u, err := r.Usage("v")
	if err != nil || u.BytesLimit != 2<<20 || u.InodesLimit != 10 {
		t.Fatalf("Usage = %+v, %v", u, err)
	}
	if _, err := r.Usage("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Usage(missing) = %v, want ErrNotFound", err)
	}
}

// TestProjectIDsNeverReusedOrColliding: deleted volumes' IDs are not handed out
// again, IDs the filesystem already uses (foreign or on stray directories) are
// skipped, and a second Root on the same directory (a restart) continues the
// sequence.
func TestProjectIDsNeverReusedOrColliding(t *testing.T) {
	dir := t.TempDir()
	q := newFakeQuota()
	q.foreign[1001] = true // e.g. chattr -p 1001 somewhere on the filesystem
	r := openFake(t, dir, q)
	a, err := r.Create("a", 4096, 1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := r.Create("b", 4096, 1)
	if err != nil {
		t.Fatal(err)
	}
	if a.Project != 1000 || b.Project != 1002 {
		t.Fatalf("projects %d, %d; want 1000, 1002 (1001 is foreign)", a.Project, b.Project)
	}
	if err := r.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if _, ok := q.limits[a.Project]; ok {
		t.Fatalf("limits of deleted volume still set")
	}
	// A stray directory in volumes/ carrying a project ID nobody recorded.
	stray := filepath.Join(dir, "volumes", "stray")
	if err := os.Mkdir(stray, 0o700); err != nil {
		t.Fatal(err)
	}
	sfd := openDir(t, stray)
	if err := q.setProject(sfd, 1003); err != nil {
		t.Fatal(err)
	}
	r.Close()

	r2 := openFake(t, dir, q) // restart
	c, err := r2.Create("c", 4096, 1)
	if err != nil {
		t.Fatal(err)
	}
	if c.Project != 1004 {
		t.Fatalf("after restart project %d, want 1004 (1000 released, 1001 foreign, 1002 b, 1003 stray)", c.Project)
	}
	again, err := r2.Create("a", 4096, 1)
	if err != nil || again.Project != 1005 {
		t.Fatalf("re-created a = %+v, %v; want a fresh project 1005", again, err)
	}
}

func TestConcurrentCreates(t *testing.T) {
	q := newFakeQuota()
	r := openFake(t, t.TempDir(), q)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := 0; i < 20; i++ {
		for _, id := range []string{fmt.Sprintf("v%d", i), "same"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := r.Create(id, 1<<20, 10); err != nil {
					errs <- err
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	list, err := r.List()
	if err != nil || len(list) != 21 {
		t.Fatalf("List: %d volumes, %v", len(list), err)
	}
	seen := map[uint32]string{}
	for _, v := range list {
		if other, dup := seen[v.Project]; dup {
			t.Fatalf("%s and %s share project %d", other, v.ID, v.Project)
		}
		seen[v.Project] = v.ID
	}
}

// TestBadInputTouchesNothing: invalid ids and sizes fail with ErrInvalid before
// any filesystem or quota call.
func TestBadInputTouchesNothing(t *testing.T) {
	dir := t.TempDir()
	q := newFakeQuota()
	r := openFake(t, dir, q)
	if _, err := r.Create("keep", 4096, 1); err != nil {
		t.Fatal(err)
	}
	before := describeTree(t, dir)
	calls := q.calls
	long := strings.Repeat("a", MaxIDLength+1)
	ids := []string{"", "..", "../x", "a/b", "/etc", long, ".simfs", "-x", "keep/.."}
	for _, id := range ids {
		checks := map[string]error{}
		_, checks["Create"] = r.Create(id, 4096, 1)
		_, checks["Expand"] = r.Expand(id, 8192, 1)
		_, checks["Usage"] = r.Usage(id)
		_, checks["Get"] = r.Get(id)
		checks["Delete"] = r.Delete(id)
		_, checks["Snapshot id"] = r.Snapshot(id, "keep")
		_, checks["Snapshot source"] = r.Snapshot("s", id)
		_, checks["Restore id"] = r.Restore(id, 4096, 1, "s")
		_, checks["Restore source"] = r.Restore("n", 4096, 1, id)
		checks["DeleteSnapshot"] = r.DeleteSnapshot(id)
		_, checks["VolumePath"] = r.VolumePath(id)
		for op, err := range checks {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%s(%q) = %v, want ErrInvalid", op, id, err)
			}
		}
	}
	for _, size := range [][2]uint64{{0, 1}, {4096, 0}, {MaxBytes + 1, 1}, {^uint64(0), 1}, {4096, MaxInodes + 1}} {
		if _, err := r.Create("new", size[0], size[1]); !errors.Is(err, ErrInvalid) {
			t.Errorf("Create size %v = %v, want ErrInvalid", size, err)
		}
		if _, err := r.Restore("new", size[0], size[1], "s"); !errors.Is(err, ErrInvalid) {
			t.Errorf("Restore size %v = %v, want ErrInvalid", size, err)
		}
		if size[0] != 0 && size[1] != 0 { // Expand treats inodes 0 as "keep"
			if _, err := r.Expand("keep", size[0], size[1]); !errors.Is(err, ErrInvalid) {
				t.Errorf("Expand size %v = %v, want ErrInvalid", size, err)
			}
		}
	}
	if d := diffTrees(before, describeTree(t, dir)); len(d) > 0 {
		t.Fatalf("bad input changed the root:\n%v", d)
	}
	if q.calls != calls {
		t.Fatalf("bad input made %d quota calls", q.calls-calls)
	}
}

func TestCreateRefusedWithoutQuota(t *testing.T) {
	dir := t.TempDir()
	q := newFakeQuota()
	q.notEnfErr = errors.New("no prjquota")
	r := openFake(t, dir, q)
	before := describeTree(t, dir)
	if _, err := r.Create("v", 4096, 1); !errors.Is(err, ErrQuotaNotEnforced) {
		t.Fatalf("Create = %v, want ErrQuotaNotEnforced", err)
	}
	if d := diffTrees(before, describeTree(t, dir)); len(d) > 0 {
		t.Fatalf("refused Create changed the root:\n%v", d)
	}
}

// TestKernelQuotaOnHost runs the real kernel interface on the test machine's
// filesystem. Whatever the host supports, Open must work and Create must
// either succeed or refuse with ErrQuotaNotEnforced, touching nothing.
func TestKernelQuotaOnHost(t *testing.T) {
	dir := t.TempDir()
	r, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	enfErr := r.QuotaEnforced()
	t.Logf("host project quota: %v", enfErr)
	before := describeTree(t, dir)
	_, err = r.Create("v", 1<<20, 10)
	if enfErr != nil {
		if !errors.Is(err, ErrQuotaNotEnforced) {
			t.Fatalf("Create without quota = %v, want ErrQuotaNotEnforced", err)
		}
		if d := diffTrees(before, describeTree(t, dir)); len(d) > 0 {
			t.Fatalf("refused Create changed the root:\n%v", d)
		}
	} else if err != nil {
		t.Fatalf("Create with quota enforced: %v", err)
	}
}

// TestSnapshotRestoreLogic: a snapshot survives its source, a restore equals
// the snapshot, restores are idempotent and size-checked.
func TestSnapshotRestoreLogic(t *testing.T) {
	dir := t.TempDir()
	q := newFakeQuota()
	r := openFake(t, dir, q)
	v, err := r.Create("src", 64<<20, 1000)
	if err != nil {
		t.Fatal(err)
	}
	buildRichTree(t, v.Path)
	want := describeTree(t, v.Path)
	s, err := r.Snapshot("snap", "src")
	if err != nil {
		t.Fatal(err)
	}
	if s.Source != "src" || s.UsedInodes != 12 || s.Bytes != 64<<20 {
		t.Fatalf("snapshot %+v", s)
	}
	if again, err := r.Snapshot("snap", "src"); err != nil || again != s {
		t.Fatalf("repeated Snapshot = %+v, %v", again, err)
	}
	if _, err := r.Create("other", 4096, 10); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Snapshot("snap", "other"); !errors.Is(err, ErrExists) {
		t.Fatalf("Snapshot id reused for other volume = %v, want ErrExists", err)
	}
	if _, err := r.Snapshot("s2", "missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Snapshot of missing volume = %v, want ErrNotFound", err)
	}
	// Writes after the snapshot do not reach it; the source's deletion neither.
	if err := os.WriteFile(filepath.Join(v.Path, "later"), []byte("later"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.Delete("src"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Restore("tiny", 4096, 1000, "snap"); !errors.Is(err, ErrConflict) {
		t.Fatalf("Restore into too small a volume = %v, want ErrConflict", err)
	}
	if _, err := r.Restore("x", 64<<20, 1000, "missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Restore of missing snapshot = %v, want ErrNotFound", err)
	}
	nv, err := r.Restore("restored", 64<<20, 1000, "snap")
	if err != nil {
		t.Fatal(err)
	}
	if nv.Source != "snap" || nv.Project == v.Project {
		t.Fatalf("restored %+v", nv)
	}
	if d := diffTrees(want, describeTree(t, nv.Path)); len(d) > 0 {
		t.Fatalf("restored volume differs from the snapshot:\n%v", d)
	}
	if again, err := r.Restore("restored", 64<<20, 1000, "snap"); err != nil || again != nv {
		t.Fatalf("repeated Restore = %+v, %v", again, err)
	}
	if _, err := r.Create("restored", 64<<20, 1000); !errors.Is(err, ErrExists) {
		t.Fatalf("Create over a restored volume = %v, want ErrExists", err)
	}
	// Deleting the snapshot leaves the restored volume intact.
	if err := r.DeleteSnapshot("snap"); err != nil {
		t.Fatal(err)
	}
	if err := r.DeleteSnapshot("snap"); err != nil {
		t.Fatalf("repeated DeleteSnapshot: %v", err)
	}
	if d := diffTrees(want, describeTree(t, nv.Path)); len(d) > 0 {
		t.Fatalf("restored volume changed by snapshot deletion:\n%v", d)
	}
	if list, err := r.ListSnapshots(); err != nil || len(list) != 0 {
		t.Fatalf("ListSnapshots = %+v, %v", list, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "snapshots", "snap")); !os.IsNotExist(err) {
		t.Fatalf("snapshot directory left: %v", err)
	}
}

func TestDamagedRegistryFailsOpen(t *testing.T) {
	dir := t.TempDir()
	r := openFake(t, dir, newFakeQuota())
	r.Close()
	if err := os.WriteFile(filepath.Join(dir, metaDir, registryFile), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r, err := open(dir, Options{}, newFakeQuota(), ""); err == nil {
		r.Close()
		t.Fatal("Open with a damaged registry succeeded")
	}
}

// TestInterruptedRequestsFinish: a crash after the registry recorded a volume
// but before it was made (Ready false) is finished by the retried request,
// with the recorded project ID; an interrupted restore is redone from scratch.
func TestInterruptedRequestsFinish(t *testing.T) {
	dir := t.TempDir()
	q := newFakeQuota()
	r := openFake(t, dir, q)
	src, err := r.Create("src", 1<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src.Path, "f"), []byte("snapshot me"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Snapshot("snap", "src"); err != nil {
		t.Fatal(err)
	}
	// Simulate the crash states directly in the registry.
	if err := r.update(func(reg *registry) (bool, error) {
		reg.Volumes["half"] = &volumeRecord{Project: reg.NextProject, Bytes: 1 << 20, Inodes: 100}
		reg.Volumes["halfrestore"] = &volumeRecord{Project: reg.NextProject + 1, Bytes: 1 << 20, Inodes: 100, Source: "snap"}
		reg.NextProject += 2
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	partial := filepath.Join(dir, volumesDir, "halfrestore")
	if err := os.MkdirAll(filepath.Join(partial, "junk"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get("half"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get of an unfinished volume = %v, want ErrNotFound", err)
	}
	r.Close()
	r = openFake(t, dir, q)
	half, err := r.Create("half", 1<<20, 100)
	if err != nil {
		t.Fatal(err)
	}
	if half.Project != 1001 || q.limits[1001] != [2]uint64{1 << 20, 100} {
		t.Fatalf("finished volume %+v, limits %v", half, q.limits)
	}
	if fi, err := os.Stat(half.Path); err != nil || !fi.IsDir() {
		t.Fatalf("volume directory: %v", err)
	}
	hr, err := r.Restore("halfrestore", 1<<20, 100, "snap")
	if err != nil {
		t.Fatal(err)
	}
	if hr.Project != 1002 {
		t.Fatalf("restored into project %d, want the recorded 1002", hr.Project)
	}
	if d := diffTrees(describeTree(t, filepath.Join(dir, snapshotsDir, "snap")), describeTree(t, hr.Path)); len(d) > 0 {
		t.Fatalf("redone restore differs from the snapshot:\n%v", d)
	}
}
