package ploop

import (
	"fmt"
	"slices"
)

// Moving data clusters inside one image (relocating grow and compaction)
// follows the format's consistency rule at every step: the copy is written
// to a cluster no BAT entry refers to and made durable, then the BAT entry
// is switched and written, and the old copy is given up only after the
// switch is durable and a barrier has waited out the reads that may still
// be looking at it. A crash before the switch leaves an unreferenced copy
// (a leak or an unused interior cluster, both harmless and trimmed by
// Repair); a crash after it leaves the old cluster unreferenced. Either way
// every BAT entry points at the cluster's contents, so the image reads the
// same.
//
// I/O goes on while clusters move: a batch of clusters is locked (their
// stripe locks, exclusively) only while it is copied, made durable and
// switched, so a write to one of them waits for one small batch, and writes
// elsewhere do not wait at all.

// clusterMove is one cluster to copy: virtual cluster i from host offset
// from to host offset to.
type clusterMove struct{ i, from, to int64 }

// Batches are bounded in bytes (the copy and the fsync under the locks)
// and in clusters (how many stripes one batch holds).
const (
	moveBatchBytes    = 4 << 20
	moveBatchClusters = 32
)

// moveClusters moves clusters batch by batch. A cluster whose entry no
// longer points at from (discarded or reallocated meanwhile) stays where
// it is; its destination is then left unreferenced (and punched). It
// returns how many clusters moved. The caller holds maintMu.
func (img *Image) moveClusters(moves []clusterMove, point string) (int64, error) {
	buf := make([]byte, img.cs)
	batch := int(max(1, min(moveBatchClusters, moveBatchBytes/img.cs)))
	var moved int64
	for len(moves) > 0 {
		n := min(batch, len(moves))
		k, err := img.moveBatch(moves[:n], buf, point)
		moved += k
		if err != nil {
			return moved, err
		}
		moves = moves[n:]
	}
	return moved, nil
}

func (img *Image) moveBatch(moves []clusterMove, buf []byte, point string) (int64, error) {
	stripes := make([]int64, 0, len(moves))
	for _, m := range moves {
		stripes = append(stripes, m.i%clusterLockStripes)
	}
	// A fixed order, so that two lockers of several stripes cannot
	// deadlock.
	slices.Sort(stripes)
	stripes = slices.Compact(stripes)
	for _, s := range stripes {
		img.clusterLocks[s].Lock()
	}
	defer func() {
		for _, s := range stripes {
			img.clusterLocks[s].Unlock()
		}
	}()
	live := make([]clusterMove, 0, len(moves))
	for _, m := range moves {
		if img.lookup(m.i) != m.from {
			if err := img.s.PunchHole(m.to, img.cs); err != nil {
				return 0, fmt.Errorf("free cluster at %d: %w", m.to, err)
			}
			continue
		}
		if err := img.readHost(buf, m.from); err != nil {
			return 0, fmt.Errorf("read cluster %d at %d: %w", m.i, m.from, err)
		}
		// Detach whatever pages the destination had (a freed zero
		// cluster may still be referenced by a spliced read reply;
		// see fileread.go), so the copy lands in fresh ones.
		if err := img.s.PunchHole(m.to, img.cs); err != nil {
			return 0, fmt.Errorf("clear cluster at %d for %d: %w", m.to, m.i, err)
		}
		if _, err := img.s.WriteAt(buf, m.to); err != nil {
			return 0, fmt.Errorf("copy cluster %d to %d: %w", m.i, m.to, err)
		}
		live = append(live, m)
		img.hooks.at(point + "-copy")
	}
	if len(live) == 0 {
		return 0, nil
	}
	if err := img.syncs.Sync(img.s.Sync); err != nil {
		return 0, err
	}
	img.hooks.at(point + "-copied")
	blocks := make([]int64, 0, len(live))
	img.mu.Lock()
	for _, m := range live {
		blocks = append(blocks, img.setEntry(m.i, m.to))
	}
	img.mu.Unlock()
	for _, m := range live {
		img.unpend(m.to)
	}
	if err := img.writeBlocks(slices.Compact(blocks)); err != nil {
		return 0, err
	}
	img.hooks.at(point + "-switched")
	return int64(len(live)), nil
}

// relocateForBAT moves the data clusters lying below newStart (where a
// larger BAT will go) to the end of the file, while I/O continues. New
// allocations are sent past newStart first; allocations that reserved
// space below it earlier are waited for and moved too. The caller holds
// maintMu, makes the switches durable and runs a barrier before reusing
// the old places.
func (img *Image) relocateForBAT(newStart int64) error {
	img.allocMu.Lock()
	img.next = max(img.next, newStart)
	img.allocMu.Unlock()
	for {
		img.allocMu.Lock()
		for img.pendingBelow(newStart) {
			img.unpended.Wait()
		}
		img.allocMu.Unlock()
		var moves []clusterMove
		img.mu.RLock()
		for i := range int64(img.hdr.BATEntries) {
			if host := img.entry(i); host != 0 && host < newStart {
				moves = append(moves, clusterMove{i: i, from: host})
			}
		}
		img.mu.RUnlock()
		if len(moves) == 0 {
			return nil
		}
		for k := range moves {
			to, err := img.reserve()
			if err != nil {
				for _, m := range moves[:k] {
					img.unpend(m.to)
				}
				return err
			}
			moves[k].to = to
		}
		if _, err := img.moveClusters(moves, "grow-relocate"); err != nil {
			return err
		}
		// Destinations of clusters that did not move are leaks now.
		for _, m := range moves {
			img.unpend(m.to)
		}
	}
}

// pendingBelow reports whether an allocation holds a reservation below
// limit. The caller holds allocMu.
func (img *Image) pendingBelow(limit int64) bool {
	for host := range img.pending {
		if host < limit {
			return true
		}
	}
	return false
}
