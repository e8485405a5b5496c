package catalog

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// TestKernel runs the catalogue's simfs volumes on the real simfs.Root with
// project quota, on ext4 and xfs, inside the test VM (this host has no
// quota): sizes round to the quota's unit and become its limits, an
// unprivileged writer stops at the limit and at the expanded limit, copies
// (snapshot, restore, clone) hold the data, ploop volumes share the root,
// and everything survives a reopen and is deleted without leftovers.
func TestKernel(t *testing.T) {
	var cases []vmtest.Case
	for _, fstype := range []string{"ext4", "xfs"} {
		cases = append(cases, vmtest.Case{Name: "Simfs_" + fstype, Run: func(t *testing.T) { testSimfsKernel(t, fstype) }})
	}
	vmtest.Run(t, vmtest.Options{}, cases)
}

// writeAsNobody writes n MiB of zeros to path as the unprivileged user
// (root is not limited by quota): the file is opened here and handed to
// dd, which writes to its standard output.
func writeAsNobody(t *testing.T, path string, n int) (int64, error) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("dd", "if=/dev/zero", "bs=1M", "count="+strconv.Itoa(n), "status=none")
	cmd.Stdout = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{
		Uid: vmtest.UnprivilegedUID, Gid: vmtest.UnprivilegedGID, NoSetGroups: true}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	if err != nil {
		t.Logf("dd as uid %d: %v: %s", vmtest.UnprivilegedUID, err, stderr.Bytes())
	}
	st, serr := f.Stat()
	if serr != nil {
		t.Fatal(serr)
	}
	return st.Size(), err
}

func testSimfsKernel(t *testing.T, fstype string) {
	mnt := vmtest.ScratchFS(t, fstype, 400)
	root := filepath.Join(mnt, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	c, err := Open(root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { c.Close() }()
	ctx := testCtx(t)

	small := mustCreate(t, c, VolumeRequest{Name: "small", Type: Simfs, RequiredBytes: 4097})
	d, err := c.dirs()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.QuotaEnforced(); err != nil {
		t.Fatalf("scratch %s: %v", fstype, err)
	}
	if sv, err := d.Get(small.ID); err != nil || small.Size != 8192 || sv.Bytes != uint64(small.Size) {
		t.Fatalf("rounding: catalogue %d, simfs %+v, %v", small.Size, sv, err)
	}

	v := mustCreate(t, c, VolumeRequest{Name: "v", Type: Simfs, RequiredBytes: 4 * mib})
	dir, err := c.VolumePath(v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := writeAsNobody(t, filepath.Join(dir, "big"), 8); err == nil || n > 4*mib {
		t.Fatalf("unprivileged write of 8 MiB into 4 MiB: %d bytes, %v", n, err)
	}
	if err := os.Remove(filepath.Join(dir, "big")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "data"), pattern(3, int(mib)), 0o644); err != nil {
		t.Fatal(err)
	}
	size, node, err := c.ExpandVolume(ctx, v.ID, 12*mib, 0)
	if err != nil || size != 12*mib || node {
		t.Fatalf("expand: %d %v %v", size, node, err)
	}
	if u, err := c.VolumeUsage(ctx, v.ID); err != nil || u.ProvisionedBytes != 12*mib || u.AllocatedBytes < mib {
		t.Fatalf("usage %+v, %v", u, err)
	}
	if n, err := writeAsNobody(t, filepath.Join(dir, "big"), 8); err != nil || n != 8*mib {
		t.Fatalf("8 MiB into the expanded 12 MiB: %d bytes, %v", n, err)
	}
	if err := os.Remove(filepath.Join(dir, "big")); err != nil {
		t.Fatal(err)
	}

	s := mustSnapshot(t, c, "s", v.ID)
	r := mustCreate(t, c, VolumeRequest{Name: "r", Type: Simfs, SourceSnapshot: s.ID})
	cl := mustCreate(t, c, VolumeRequest{Name: "cl", Type: Simfs, SourceVolume: v.ID, RequiredBytes: 16 * mib})
	for _, id := range []string{r.ID, cl.ID} {
		p, _ := c.VolumePath(id)
		b, err := os.ReadFile(filepath.Join(p, "data"))
		if err != nil {
			t.Fatal(err)
		}
		equalData(t, "copy "+id, b, pattern(3, int(mib)))
	}

	// A ploop volume on the same root; capacity counts both types.
	p := mustCreate(t, c, VolumeRequest{Name: "p", RequiredBytes: 32 * mib})
	capa, err := c.Capacity(ctx, "")
	if err != nil || capa.ProvisionedBytes != small.Size+12*mib+r.Size+cl.Size+p.Size {
		t.Fatalf("capacity %+v, %v", capa, err)
	}
	// With project quota enforced, simfs volumes are promised what any
	// volume is (the free space moves only with this test's own writes).
	if sc, err := c.Capacity(ctx, Simfs); err != nil || sc.Refused != nil || sc.AvailableBytes == 0 || sc.ProvisionedBytes != capa.ProvisionedBytes {
		t.Fatalf("simfs capacity with quota: %+v, %v", sc, err)
	}
	for _, id := range []string{v.ID, r.ID, cl.ID, p.ID} {
		if cond, err := c.Condition(ctx, id); err != nil || cond.Abnormal {
			t.Fatalf("condition of %s: %+v, %v", id, cond, err)
		}
	}

	c.Close()
	c, err = Open(root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	vols, _, err := c.ListVolumes(ctx, "", 0)
	if err != nil || len(vols) != 5 {
		t.Fatalf("after reopen: %v, %v", vols, err)
	}
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	r2 := mustCreate(t, c, VolumeRequest{Name: "r2", Type: Simfs, SourceSnapshot: s.ID})
	if err := c.DeleteSnapshot(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{small.ID, r.ID, r2.ID, cl.ID, p.ID} {
		if err := c.DeleteVolume(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	for _, sub := range []string{"simfs/volumes", "simfs/snapshots", "ploop/volumes", "ploop/snapshots", "catalog/volumes", "catalog/snapshots"} {
		if left := listDir(t, filepath.Join(root, sub)); len(left) != 0 {
			t.Errorf("%s left: %v", sub, left)
		}
	}
}
