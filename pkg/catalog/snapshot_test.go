package catalog

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// TestSnapshotSurvivesSourceDeletion: a snapshot is a stack of its own, so
// it restores the snapshot point after its source is deleted, into a volume
// of the same or a larger size.
func TestSnapshotSurvivesSourceDeletion(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "src", RequiredBytes: 16 * mib})
	vdir := c.stackDir(v.ID)
	writeVolume(t, vdir, 0, pattern(1, int(4*mib)))
	writeVolume(t, vdir, 9*mib+4096, pattern(2, 100000))
	want := readVolume(t, vdir)

	s := mustSnapshot(t, c, "snap", v.ID)
	if s.Size != v.Size || s.SourceVolume != v.ID || s.Type != Ploop {
		t.Fatalf("snapshot %+v", s)
	}
	if again := mustSnapshot(t, c, "snap", v.ID); again.ID != s.ID {
		t.Fatalf("repeat gave %s, want %s", again.ID, s.ID)
	}
	other := mustCreate(t, c, VolumeRequest{Name: "other", RequiredBytes: mib})
	_, err := c.CreateSnapshot(ctx, "snap", other.ID)
	wantErr(t, err, ErrExists, "same snapshot name, other source")

	writeVolume(t, vdir, 2*mib, pattern(3, int(3*mib))) // after the snapshot point
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(vdir); !os.IsNotExist(err) {
		t.Fatalf("source stack still there: %v", err)
	}
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if got, err := c.GetSnapshot(ctx, s.ID); err != nil || got.ID != s.ID {
		t.Fatalf("snapshot after source deletion: %+v, %v", got, err)
	}
	qemuCheckStack(t, c.snapDir(s.ID))

	r := mustCreate(t, c, VolumeRequest{Name: "restored", SourceSnapshot: s.ID})
	if r.Size != v.Size || r.SourceSnapshot != s.ID {
		t.Fatalf("restored %+v", r)
	}
	equalData(t, "restored", readVolume(t, c.stackDir(r.ID)), want)
	qemuCheckStack(t, c.stackDir(r.ID))

	big := mustCreate(t, c, VolumeRequest{Name: "bigger", SourceSnapshot: s.ID, RequiredBytes: 40 * mib})
	got := readVolume(t, c.stackDir(big.ID))
	if int64(len(got)) != 40*mib {
		t.Fatalf("grown restore is %d bytes", len(got))
	}
	equalData(t, "grown restore", got[:len(want)], want)
	equalData(t, "grown tail", got[len(want):], make([]byte, len(got)-len(want)))
	qemuCheckStack(t, c.stackDir(big.ID))

	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "smaller", SourceSnapshot: s.ID, RequiredBytes: 8 * mib})
	wantErr(t, err, ErrOutOfRange, "restore smaller than the snapshot")
	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "xfs", SourceSnapshot: s.ID, FSType: FSXfs})
	wantErr(t, err, ErrInvalid, "restore with another filesystem")
	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "simfs", SourceSnapshot: s.ID, Type: Simfs})
	wantErr(t, err, ErrInvalid, "restore into another type")

	// The restored volumes are independent of the snapshot and of each other.
	writeVolume(t, c.stackDir(r.ID), 0, pattern(9, int(mib)))
	if err := c.DeleteSnapshot(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	equalData(t, "bigger after snapshot deletion", readVolume(t, c.stackDir(big.ID))[:len(want)], want)
	checkConsistent(t, c)
}

// TestCloneFromVolume: a clone of a volume is O(1) (no data copied): the
// source's frozen delta is shared, stays in the source's chain while the
// clone links it, and is merged once the clone is gone.
func TestCloneFromVolume(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "src", RequiredBytes: 16 * mib, FSType: FSXfs, ClusterSize: 256 << 10})
	vdir := c.stackDir(v.ID)
	writeVolume(t, vdir, mib, pattern(4, int(6*mib)))
	want := readVolume(t, vdir)
	before, err := c.VolumeUsage(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}

	cl := mustCreate(t, c, VolumeRequest{Name: "clone", SourceVolume: v.ID, FSType: FSXfs})
	if cl.ClusterSize != v.ClusterSize || cl.Size != v.Size || cl.SourceVolume != v.ID {
		t.Fatalf("clone %+v", cl)
	}
	if again := mustCreate(t, c, VolumeRequest{Name: "clone", SourceVolume: v.ID, FSType: FSXfs}); again.ID != cl.ID {
		t.Fatal("repeat made another clone")
	}
	cdir := c.stackDir(cl.ID)
	equalData(t, "clone", readVolume(t, cdir), want)
	qemuCheckStack(t, cdir)
	qemuCheckStack(t, vdir)
	// No data was copied: the root holds what it held, plus two empty tops.
	ru, err := c.RootUsage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ru.AllocatedBytes > before.AllocatedBytes+2*mib {
		t.Fatalf("clone allocated %d bytes, source had %d", ru.AllocatedBytes, before.AllocatedBytes)
	}
	if depth(t, vdir) != 2 {
		t.Fatalf("source depth %d, want 2 (the shared delta and its top)", depth(t, vdir))
	}

	writeVolume(t, vdir, mib, pattern(5, 4096))
	writeVolume(t, cdir, 2*mib, pattern(6, 4096))
	gotClone := readVolume(t, cdir)
	equalData(t, "clone after source write", gotClone[:2*mib], want[:2*mib])
	vNow := readVolume(t, vdir)
	equalData(t, "source after clone write", vNow[2*mib:], want[2*mib:])

	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "c2", SourceVolume: v.ID, FSType: FSXfs, ClusterSize: mib})
	wantErr(t, err, ErrInvalid, "clone with another cluster size")
	big := mustCreate(t, c, VolumeRequest{Name: "c3", SourceVolume: v.ID, FSType: FSXfs, RequiredBytes: 20 * mib})
	if depth(t, c.stackDir(big.ID)) != 3 || big.Size != 20*mib {
		t.Fatalf("grown clone: depth %d size %d", depth(t, c.stackDir(big.ID)), big.Size)
	}
	equalData(t, "grown clone", readVolume(t, c.stackDir(big.ID))[:16*mib], vNow)

	// Deleting the source keeps the clone; deleting the clones lets the
	// source merge what they shared.
	if err := c.DeleteVolume(ctx, big.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVolume(ctx, cl.ID); err != nil {
		t.Fatal(err)
	}
	if d := depth(t, vdir); d != 1 {
		t.Fatalf("source depth %d after its clones went, want 1", d)
	}
	equalData(t, "source after merges", readVolume(t, vdir), vNow)
	qemuCheckStack(t, vdir)

	cl2 := mustCreate(t, c, VolumeRequest{Name: "clone2", SourceVolume: v.ID, FSType: FSXfs})
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	equalData(t, "clone after source deletion", readVolume(t, c.stackDir(cl2.ID)), vNow)
	checkConsistent(t, c)
}

// TestDeleteSnapshotMerges: deleting a snapshot merges its delta in the
// source, so the chain stays as long as the live snapshots while snapshots
// rotate, and every live snapshot and restore still reads its own point.
func TestDeleteSnapshotMerges(t *testing.T) {
	c := newFastCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 8 * mib, ClusterSize: 64 << 10})
	vdir := c.stackDir(v.ID)
	type point struct {
		snap Snapshot
		data []byte
	}
	var live []point
	var restores []point
	const keep = 3
	for round := range 12 {
		// Each round rewrites part of what earlier rounds wrote, so merges
		// meet clusters both deltas hold.
		writeVolume(t, vdir, int64(round%5)*mib+int64(round)*8192, pattern(byte(round+10), int(mib+12345)))
		data := readVolume(t, vdir)
		s := mustSnapshot(t, c, fmt.Sprintf("s%d", round), v.ID)
		live = append(live, point{s, data})
		if round%4 == 1 {
			r := mustCreate(t, c, VolumeRequest{Name: fmt.Sprintf("r%d", round), SourceSnapshot: s.ID})
			restores = append(restores, point{Snapshot{ID: r.ID}, data})
		}
		if len(live) > keep {
			if err := c.DeleteSnapshot(ctx, live[0].snap.ID); err != nil {
				t.Fatal(err)
			}
			live = live[1:]
		}
		if d := depth(t, vdir); d != len(live)+1 {
			t.Fatalf("round %d: depth %d with %d live snapshots", round, d, len(live))
		}
	}
	for _, p := range live {
		r := mustCreate(t, c, VolumeRequest{Name: "check-" + p.snap.Name, SourceSnapshot: p.snap.ID})
		equalData(t, "live snapshot "+p.snap.Name, readVolume(t, c.stackDir(r.ID)), p.data)
		qemuCheckStack(t, c.snapDir(p.snap.ID))
	}
	for _, p := range restores {
		equalData(t, "restore "+p.snap.ID, readVolume(t, c.stackDir(p.snap.ID)), p.data)
		qemuCheckStack(t, c.stackDir(p.snap.ID))
	}
	final := readVolume(t, vdir)
	for _, p := range live {
		if err := c.DeleteSnapshot(ctx, p.snap.ID); err != nil {
			t.Fatal(err)
		}
	}
	if d := depth(t, vdir); d != 1 {
		t.Fatalf("depth %d after every snapshot went", d)
	}
	equalData(t, "volume after merges", readVolume(t, vdir), final)
	qemuCheckStack(t, vdir)
	checkConsistent(t, c)
}

// TestMergeIntoSharedDelta checks the claim the catalogue's merges rest on,
// against pkg/ploop directly: merging delta k into k+1 is safe even when
// k+1 is shared with other stacks, because every stack that links k+1
// reads, below it, what k holds.
func TestMergeIntoSharedDelta(t *testing.T) {
	dir := t.TempDir()
	v := filepath.Join(dir, "v")
	if err := ploop.InitStack(v, ploop.InitOptions{Size: 4 * mib, ClusterSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	// Three frozen states, each rewriting part of the one below.
	var guids []string
	for i := range 3 {
		writeVolume(t, v, int64(i)*200<<10, pattern(byte(i+1), 300<<10))
		g, err := ploop.Snapshot(v)
		if err != nil {
			t.Fatal(err)
		}
		guids = append(guids, g)
	}
	// a links k+1 = guids[1] (and k below it), b links everything.
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	if err := ploop.Clone(v, guids[1], a); err != nil {
		t.Fatal(err)
	}
	if err := ploop.Clone(v, guids[2], b); err != nil {
		t.Fatal(err)
	}
	writeVolume(t, a, 100<<10, pattern(7, 64<<10))
	views := map[string][]byte{v: readVolume(t, v), a: readVolume(t, a), b: readVolume(t, b)}
	for _, k := range []string{guids[0], guids[1]} {
		// Merge k into the delta above it in v; that delta is linked by a
		// and b (and, for guids[0], so is k).
		if err := ploop.DeleteSnapshot(v, k); err != nil {
			t.Fatal(err)
		}
		for d, want := range views {
			equalData(t, "after merging "+k+": "+d, readVolume(t, d), want)
			qemuCheckStack(t, d)
		}
	}
	if depth(t, v) != 2 {
		t.Fatalf("depth %d", depth(t, v))
	}
}

// TestChainLimit: a volume can have as many snapshots as the ploop chain
// limit allows; the next is ErrLimit, and deleting any snapshot (its delta
// merges into one later snapshots share) makes room again without
// breaking the others.
func TestChainLimit(t *testing.T) {
	c := newFastCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 2 * mib, ClusterSize: 64 << 10})
	vdir := c.stackDir(v.ID)
	snaps := make([]Snapshot, 0, ploop.MaxChain)
	var second []byte
	for i := 0; i < ploop.MaxChain-1; i++ {
		if i < 3 {
			writeVolume(t, vdir, int64(i)*64<<10, pattern(byte(i+1), 100<<10))
		}
		if i == 1 {
			second = readVolume(t, vdir)
		}
		snaps = append(snaps, mustSnapshot(t, c, fmt.Sprintf("s%03d", i), v.ID))
	}
	if d := depth(t, vdir); d != ploop.MaxChain {
		t.Fatalf("depth %d", d)
	}
	_, err := c.CreateSnapshot(ctx, "one-too-many", v.ID)
	wantErr(t, err, ErrLimit, "snapshot past the chain limit")
	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "clone", SourceVolume: v.ID})
	wantErr(t, err, ErrLimit, "clone past the chain limit")
	checkConsistent(t, c)

	// The oldest snapshot's delta merges into the next one, which the
	// later 125 snapshot stacks link too.
	if err := c.DeleteSnapshot(ctx, snaps[0].ID); err != nil {
		t.Fatal(err)
	}
	if d := depth(t, vdir); d != ploop.MaxChain-1 {
		t.Fatalf("depth %d after a deletion", d)
	}
	mustSnapshot(t, c, "one-more", v.ID)
	r := mustCreate(t, c, VolumeRequest{Name: "r", SourceSnapshot: snaps[1].ID})
	equalData(t, "second snapshot after the merge", readVolume(t, c.stackDir(r.ID)), second)
	qemuCheckStack(t, c.snapDir(snaps[1].ID))
	checkConsistent(t, c)
}

// TestCloneMakesRoom: when a volume's chain is full of deltas its clones
// share (no snapshot needs them), a new snapshot merges one to make room.
func TestCloneMakesRoom(t *testing.T) {
	if testing.Short() {
		t.Skip("127 clones")
	}
	c := newFastCatalog(t, Options{})
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 2 * mib, ClusterSize: 64 << 10})
	vdir := c.stackDir(v.ID)
	writeVolume(t, vdir, 0, pattern(1, 300<<10))
	want := readVolume(t, vdir)
	var clones []Volume
	for i := 0; i < ploop.MaxChain-1; i++ {
		clones = append(clones, mustCreate(t, c, VolumeRequest{Name: fmt.Sprintf("c%03d", i), SourceVolume: v.ID}))
	}
	if d := depth(t, vdir); d != ploop.MaxChain {
		t.Fatalf("depth %d", d)
	}
	s := mustSnapshot(t, c, "s", v.ID)
	if d := depth(t, vdir); d != ploop.MaxChain {
		t.Fatalf("depth %d after making room", d)
	}
	for _, cl := range []Volume{clones[0], clones[len(clones)-1]} {
		equalData(t, "clone "+cl.Name, readVolume(t, c.stackDir(cl.ID)), want)
	}
	r := mustCreate(t, c, VolumeRequest{Name: "r", SourceSnapshot: s.ID})
	equalData(t, "restore", readVolume(t, c.stackDir(r.ID)), want)
	checkConsistent(t, c)
}
