package catalog

import (
	"errors"
	"fmt"
	"sync"
	"testing"
)

// TestCapacityArithmetic: what can be promised is size × ratio minus the
// provisioned sizes, never more than free × ratio; creation and expansion
// past it fail at once with ErrNoSpace and leave nothing behind.
func TestCapacityArithmetic(t *testing.T) {
	var mu sync.Mutex
	total, free := 100*mib, 100*mib
	statfs := func(string) (int64, int64, error) {
		mu.Lock()
		defer mu.Unlock()
		return total, free, nil
	}
	for _, tc := range []struct {
		ratio float64
		// total, free; then the sizes created in order and whether each fits
		total, free int64
		steps       []int64
		fits        []bool
		avail       int64 // what Capacity says at the end
	}{
		{1, 100 * mib, 100 * mib, []int64{60 * mib, 41 * mib, 40 * mib, mib}, []bool{true, false, true, false}, 0},
		{1, 100 * mib, 30 * mib, []int64{31 * mib, 30 * mib, 30 * mib}, []bool{false, true, true}, 30 * mib}, // thin: free stays
		{2, 100 * mib, 100 * mib, []int64{150 * mib, 51 * mib, 50 * mib}, []bool{true, false, true}, 0},
		{2, 100 * mib, 10 * mib, []int64{21 * mib, 20 * mib}, []bool{false, true}, 20 * mib},
		{0.5, 100 * mib, 100 * mib, []int64{51 * mib, 50 * mib, mib}, []bool{false, true, false}, 0},
	} {
		t.Run(fmt.Sprintf("ratio%g_free%d", tc.ratio, tc.free>>20), func(t *testing.T) {
			mu.Lock()
			total, free = tc.total, tc.free
			mu.Unlock()
			c, root := newCatalog(t, Options{OvercommitRatio: tc.ratio, statfs: statfs})
			ctx := testCtx(t)
			var prov int64
			for i, size := range tc.steps {
				before := treeHash(t, root)
				_, err := c.CreateVolume(ctx, VolumeRequest{Name: fmt.Sprint(i), RequiredBytes: size})
				if !tc.fits[i] {
					wantErr(t, err, ErrNoSpace, fmt.Sprintf("step %d (%d MiB)", i, size>>20))
					if treeHash(t, root) != before {
						t.Fatalf("step %d: a refused creation changed the root", i)
					}
					continue
				}
				if err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				prov += size
			}
			capa, err := c.Capacity(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			if capa.ProvisionedBytes != prov || capa.AvailableBytes != tc.avail || capa.Ratio != tc.ratio {
				t.Fatalf("capacity %+v, want provisioned %d, available %d", capa, prov, tc.avail)
			}
		})
	}

	// Expansion draws on the same capacity; a refused one changes nothing.
	mu.Lock()
	total, free = 100*mib, 100*mib
	mu.Unlock()
	c, _ := newCatalog(t, Options{statfs: statfs})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 50 * mib})
	mustCreate(t, c, VolumeRequest{Name: "w", RequiredBytes: 30 * mib})
	_, _, err := c.ExpandVolume(ctx, v.ID, 71*mib, 0)
	wantErr(t, err, ErrNoSpace, "expansion past the capacity")
	if got, _ := c.GetVolume(ctx, v.ID); got.Size != 50*mib || depth(t, c.stackDir(v.ID)) != 1 {
		t.Fatalf("refused expansion changed the volume: %+v", got)
	}
	if size, node, err := c.ExpandVolume(ctx, v.ID, 70*mib, 0); err != nil || size != 70*mib || !node {
		t.Fatalf("expansion to the limit: %d %v %v", size, node, err)
	}
	if capa, _ := c.Capacity(ctx, ""); capa.AvailableBytes != 0 {
		t.Fatalf("after expansion: %+v", capa)
	}
	_, err = c.CreateVolume(ctx, VolumeRequest{Name: "x", RequiredBytes: mib})
	wantErr(t, err, ErrNoSpace, "creation when full")
	if err := c.DeleteVolume(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	if capa, _ := c.Capacity(ctx, ""); capa.AvailableBytes != 70*mib {
		t.Fatalf("after deletion: %+v", capa)
	}
}

// TestCapacityRealFilesystem: against the real filesystem of the test
// root, with ratio 1.0, volumes of exactly what Capacity promises are
// accepted until nothing is left, and then 1 MiB more is ErrNoSpace.
func TestCapacityRealFilesystem(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	for i := 0; ; i++ {
		capa, err := c.Capacity(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		size := capa.AvailableBytes / mib * mib
		if size < mib {
			break
		}
		if i > 1000 {
			t.Fatalf("capacity does not shrink: %+v", capa)
		}
		// A thin volume as large as the promise; the BAT of a huge one
		// needs a larger cluster size.
		cs := int64(mib)
		for size/cs > maxBATEntries {
			cs *= 2
		}
		if _, err := c.CreateVolume(ctx, VolumeRequest{Name: fmt.Sprint(i), RequiredBytes: size, ClusterSize: cs}); err != nil {
			t.Fatalf("volume %d of %d bytes (%s): %v", i, size, capa, err)
		}
	}
	_, err := c.CreateVolume(ctx, VolumeRequest{Name: "one-more", RequiredBytes: mib})
	wantErr(t, err, ErrNoSpace, "the volume past the root's size")
	capa, _ := c.Capacity(ctx, "")
	if capa.ProvisionedBytes < capa.TotalBytes-mib {
		t.Fatalf("provisioned %d of %d", capa.ProvisionedBytes, capa.TotalBytes)
	}
}

// TestVolumeUsage: provisioned and allocated bytes per volume and root;
// shared deltas count once for the root and are not exclusive.
func TestVolumeUsage(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 32 * mib})
	u0, err := c.VolumeUsage(ctx, v.ID)
	if err != nil || u0.ProvisionedBytes != 32*mib || u0.AllocatedBytes > mib {
		t.Fatalf("empty volume: %+v, %v", u0, err)
	}
	writeVolume(t, c.stackDir(v.ID), 0, pattern(1, int(8*mib)))
	u1, _ := c.VolumeUsage(ctx, v.ID)
	if u1.AllocatedBytes < 8*mib || u1.ExclusiveBytes != u1.AllocatedBytes {
		t.Fatalf("after 8 MiB: %+v", u1)
	}
	mustSnapshot(t, c, "s", v.ID)
	u2, _ := c.VolumeUsage(ctx, v.ID)
	if u2.AllocatedBytes < 8*mib || u2.ExclusiveBytes > mib {
		t.Fatalf("after a snapshot the data is shared: %+v", u2)
	}
	ru, err := c.RootUsage(ctx)
	if err != nil || ru.Volumes != 1 || ru.Snapshots != 1 || ru.AllocatedBytes < 8*mib || ru.AllocatedBytes > 10*mib ||
		ru.ProvisionedBytes != 32*mib {
		t.Fatalf("root: %+v, %v", ru, err)
	}
}

// TestCapacityByType: the promise for simfs volumes is 0 on a root whose
// filesystem does not enforce project quota, where every simfs creation
// would fail, so that a scheduler never picks the node for them; ploop
// volumes keep the whole promise. With quota, both get it.
func TestCapacityByType(t *testing.T) {
	statfs := func(string) (int64, int64, error) { return 100 * mib, 100 * mib, nil }
	for _, tc := range []struct {
		name        string
		notEnforced error
		simfs       int64
	}{
		{"quota", nil, 100 * mib},
		{"noQuota", errors.New("prjquota is off"), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			open := func(dir string) (dirVolumes, error) {
				d, err := openDiskDirs(dir)
				if err == nil {
					d.(*diskDirs).notEnforced = tc.notEnforced
				}
				return d, err
			}
			c, _ := newCatalog(t, Options{statfs: statfs, openDirs: open})
			ctx := testCtx(t)
			for typ, want := range map[Type]int64{"": 100 * mib, Ploop: 100 * mib, Simfs: tc.simfs} {
				capa, err := c.Capacity(ctx, typ)
				if err != nil || capa.AvailableBytes != want || (capa.Refused != nil) != (want == 0) {
					t.Errorf("capacity for %q: %+v, %v; want %d available", typ, capa, err, want)
				}
				if capa.Refused != nil && !errors.Is(capa.Refused, ErrPrecondition) {
					t.Errorf("refused for %v, want ErrPrecondition", capa.Refused)
				}
			}
			_, err := c.Capacity(ctx, "lvm")
			wantErr(t, err, ErrInvalid, "capacity for an unknown type")
		})
	}
}
