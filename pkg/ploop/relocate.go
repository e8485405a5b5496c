package ploop

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

// Moving data clusters inside one image (relocating grow and compaction)
// follows the format's consistency rule at every step: the copy is written
// to a cluster no BAT entry refers to and made durable, then the BAT entry
// is switched and written, and the old copy is given up only after the
// switch is durable and the reads that may still be looking at it were
// waited out (see grace). A crash before the switch leaves an unreferenced copy
// (a leak or an unused interior cluster, both harmless and trimmed by
// Repair); a crash after it leaves the old cluster unreferenced. Either way
// every BAT entry points at the cluster's contents, so the image reads the
// same.
//
// I/O goes on while clusters move: a batch of clusters is locked (their
// stripe locks, exclusively) only while it is copied and while it is
// switched, so a write to one of them waits for the copy of one small
// batch, never for an fsync, and writes elsewhere do not wait at all. A
// cluster written between its copy and its switch is copied again (see
// moveTracker).

// clusterMove is one cluster to copy: virtual cluster i from host offset
// from to host offset to.
type clusterMove struct{ i, from, to int64 }

// Batches are bounded in bytes (the copy and the fsync under the locks)
// and in clusters (how many stripes one batch holds).
const (
	moveBatchBytes    = 4 << 20
	moveBatchClusters = 32
)

// moveTracker lets a mover copy clusters without holding their locks
// through the fsync that must follow the copy: the mover registers the
// clusters it copies, writers that change one of them meanwhile mark it
// (under the cluster's stripe lock), and after the fsync the mover switches
// only the clusters nobody marked. Writers to other clusters only read an
// atomic counter of their stripe.
type moveTracker struct {
	active [clusterLockStripes]atomic.Int32
	mu     sync.Mutex
	dirty  map[int64]bool
}

// changed records that cluster i's contents changed; the caller holds its
// stripe lock.
func (m *moveTracker) changed(i int64) {
	if m.active[i%clusterLockStripes].Load() == 0 {
		return
	}
	m.mu.Lock()
	if _, ok := m.dirty[i]; ok {
		m.dirty[i] = true
	}
	m.mu.Unlock()
}

func (m *moveTracker) register(moves []clusterMove) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dirty == nil {
		m.dirty = map[int64]bool{}
	}
	for _, mv := range moves {
		m.dirty[mv.i] = false
		m.active[mv.i%clusterLockStripes].Add(1)
	}
}

// unregister forgets the clusters and reports which were changed.
func (m *moveTracker) unregister(moves []clusterMove) map[int64]bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	changed := map[int64]bool{}
	for _, mv := range moves {
		if m.dirty[mv.i] {
			changed[mv.i] = true
		}
		delete(m.dirty, mv.i)
		m.active[mv.i%clusterLockStripes].Add(-1)
	}
	return changed
}

// moveAttempts is how often a cluster is copied without its lock held
// through the fsync before a batch holds it throughout (a cluster written
// without pause would otherwise never settle).
const moveAttempts = 3

// moveClusters moves clusters batch by batch. A cluster whose entry no
// longer points at from (discarded or reallocated meanwhile) stays where
// it is; its destination is then left unreferenced (and punched). It
// returns how many clusters moved. The caller holds maintMu.
func (img *Image) moveClusters(moves []clusterMove, point string) (int64, error) {
	buf := make([]byte, img.cs)
	batch := int(max(1, min(moveBatchClusters, moveBatchBytes/img.cs)))
	var moved int64
	for attempt := 1; len(moves) > 0; attempt++ {
		var again []clusterMove
		for len(moves) > 0 {
			n := min(batch, len(moves))
			k, retry, err := img.moveBatch(moves[:n], buf, point, attempt >= moveAttempts)
			moved += k
			if err != nil {
				return moved, err
			}
			again = append(again, retry...)
			moves = moves[n:]
		}
		moves = again
	}
	return moved, nil
}

// moveBatch copies a batch of clusters, makes the copies durable and
// switches their entries; it returns the moves to try again because their
// cluster was written meanwhile. With hold, the clusters stay locked from
// the copy to the switch, which cannot fail that way.
func (img *Image) moveBatch(moves []clusterMove, buf []byte, point string, hold bool) (int64, []clusterMove, error) {
	stripes := make([]int64, 0, len(moves))
	for _, m := range moves {
		stripes = append(stripes, m.i%clusterLockStripes)
	}
	// A fixed order, so that two lockers of several stripes cannot
	// deadlock.
	slices.Sort(stripes)
	stripes = slices.Compact(stripes)
	lock := func() {
		for _, s := range stripes {
			img.clusterLocks[s].Lock()
		}
	}
	unlock := func() {
		for _, s := range stripes {
			img.clusterLocks[s].Unlock()
		}
	}
	img.moving.register(moves)
	registered := true
	defer func() {
		if registered {
			img.moving.unregister(moves)
		}
	}()
	lock()
	live := make([]clusterMove, 0, len(moves))
	for _, m := range moves {
		if img.lookup(m.i) != m.from {
			if err := img.s.PunchHole(m.to, img.cs); err != nil {
				unlock()
				return 0, nil, fmt.Errorf("free cluster at %d: %w", m.to, err)
			}
			continue
		}
		if err := img.readHost(buf, m.from); err != nil {
			unlock()
			return 0, nil, fmt.Errorf("read cluster %d at %d: %w", m.i, m.from, err)
		}
		// Detach whatever pages the destination had (a freed zero
		// cluster may still be referenced by a spliced read reply;
		// see fileread.go), so the copy lands in fresh ones.
		if err := img.s.PunchHole(m.to, img.cs); err != nil {
			unlock()
			return 0, nil, fmt.Errorf("clear cluster at %d for %d: %w", m.to, m.i, err)
		}
		if _, err := img.s.WriteAt(buf, m.to); err != nil {
			unlock()
			return 0, nil, fmt.Errorf("copy cluster %d to %d: %w", m.i, m.to, err)
		}
		live = append(live, m)
		img.hooks.at(point + "-copy")
	}
	if len(live) == 0 {
		unlock()
		return 0, nil, nil
	}
	if !hold {
		unlock()
	}
	if err := img.syncs.Sync(img.s.Sync); err != nil {
		if hold {
			unlock()
		}
		return 0, nil, err
	}
	img.hooks.at(point + "-copied")
	if !hold {
		lock()
	}
	defer unlock()
	changed := img.moving.unregister(moves)
	registered = false
	var retry []clusterMove
	blocks := make([]int64, 0, len(live))
	img.mu.Lock()
	for _, m := range live {
		if changed[m.i] || img.entry(m.i) != m.from {
			retry = append(retry, m)
			continue
		}
		blocks = append(blocks, img.setEntry(m.i, m.to))
	}
	img.mu.Unlock()
	for _, m := range live {
		img.unpend(m.to)
	}
	if err := img.writeBlocks(slices.Compact(blocks)); err != nil {
		return 0, nil, err
	}
	img.hooks.at(point + "-switched")
	return int64(len(live) - len(retry)), retry, nil
}

// relocateForBAT moves the data clusters lying below newStart (where a
// larger BAT will go) to the end of the file, while I/O continues. New
// allocations are sent past newStart first; allocations that reserved
// space below it earlier are waited for and moved too. The caller holds
// maintMu, makes the switches durable and waits out the reads of the old
// places before reusing them.
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
