package catalog

import (
	"fmt"
	"sync"
	"testing"
)

// TestConcurrency runs creations, snapshots, clones, restores, expansions,
// listings and deletions from many goroutines at once, several of them on
// the same names and the same volume (run it with -race). Every repeat of a
// name gets the same object, and at the end the root holds exactly what the
// records say, before and after a reopen.
func TestConcurrency(t *testing.T) {
	c := newFastCatalog(t, Options{})
	ctx := testCtx(t)
	const workers = 8
	rounds := 4
	if testing.Short() {
		rounds = 2
	}
	var mu sync.Mutex
	sharedIDs := map[string]bool{}
	snapIDs := map[string]bool{}
	var wg sync.WaitGroup
	errs := make(chan error, workers*rounds*20)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fail := func(format string, args ...any) {
				errs <- fmt.Errorf("worker %d: "+format, append([]any{w}, args...)...)
			}
			for r := range rounds {
				shared, err := c.CreateVolume(ctx, VolumeRequest{Name: "shared", RequiredBytes: 8 * mib})
				if err != nil {
					fail("shared: %v", err)
					return
				}
				// Every worker snapshots the shared volume under one
				// name per round, and under a name of its own.
				s1, err := c.CreateSnapshot(ctx, fmt.Sprint("shared-snap-", r), shared.ID)
				if err != nil {
					fail("shared snapshot: %v", err)
					return
				}
				mine, err := c.CreateSnapshot(ctx, fmt.Sprintf("snap-%d-%d", w, r), shared.ID)
				if err != nil {
					fail("own snapshot: %v", err)
					return
				}
				mu.Lock()
				sharedIDs[shared.ID] = true
				snapIDs[fmt.Sprint(r, s1.ID)] = true
				mu.Unlock()
				own, err := c.CreateVolume(ctx, VolumeRequest{Name: fmt.Sprintf("own-%d-%d", w, r), RequiredBytes: 4 * mib})
				if err != nil {
					fail("own: %v", err)
					return
				}
				restored, err := c.CreateVolume(ctx, VolumeRequest{Name: fmt.Sprintf("restored-%d-%d", w, r), SourceSnapshot: mine.ID})
				if err != nil {
					fail("restore: %v", err)
					return
				}
				clone, err := c.CreateVolume(ctx, VolumeRequest{Name: fmt.Sprintf("clone-%d-%d", w, r), SourceVolume: shared.ID})
				if err != nil {
					fail("clone: %v", err)
					return
				}
				if _, _, err := c.ExpandVolume(ctx, own.ID, int64(8+w)*mib, 0); err != nil {
					fail("expand: %v", err)
				}
				if _, _, err := c.ListVolumes(ctx, "", 3); err != nil {
					fail("list: %v", err)
				}
				if _, _, err := c.ListSnapshots(ctx, SnapshotFilter{SourceVolume: shared.ID}, "", 0); err != nil {
					fail("list snapshots: %v", err)
				}
				if _, err := c.Capacity(ctx, ""); err != nil {
					fail("capacity: %v", err)
				}
				// Deletions race each other on the shared round snapshot.
				for _, id := range []string{mine.ID, s1.ID} {
					if err := c.DeleteSnapshot(ctx, id); err != nil {
						fail("delete snapshot: %v", err)
					}
				}
				for _, id := range []string{clone.ID, restored.ID, own.ID} {
					if err := c.DeleteVolume(ctx, id); err != nil {
						fail("delete volume: %v", err)
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	if len(sharedIDs) != 1 {
		t.Fatalf("the shared name gave %d volumes", len(sharedIDs))
	}
	vols, _, err := c.ListVolumes(ctx, "", 0)
	if err != nil || len(vols) != 1 {
		t.Fatalf("left: %v, %v", vols, err)
	}
	snaps, _, err := c.ListSnapshots(ctx, SnapshotFilter{}, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		t.Errorf("snapshot %s (%s) left", s.ID, s.Name)
	}
	checkConsistent(t, c)
	// Every snapshot's delta has been merged back.
	if d := depth(t, c.stackDir(vols[0].ID)); d != 1 {
		t.Errorf("shared volume depth %d", d)
	}
	c = reopen(t, c, Options{})
	checkConsistent(t, c)
}
