package ploop

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Online operations run on a Stack that is open for writing and being
// served. The process serving a stack holds its directory lock, so the
// offline functions (Snapshot, DeleteSnapshot, GrowStack) cannot run on it;
// these methods do the same on-disk steps through the open stack instead.
//
// Each one does its slow work (creating files, copying and moving
// clusters, fsyncs of data) while I/O continues. Snapshot and merge pause
// I/O — by taking s.io exclusively, which waits for the requests in flight
// — only for the O(1) switch of the chain (closing or reopening a delta,
// writing the descriptor); grow and compaction do not pause it at all:
// clusters move under their own locks (see Image), and a file range given
// up is reused only after the requests that may still read it have ended
// (see grace). The on-disk order of steps is that of the offline
// operations, so a crash at any point is repaired the same way.

// OnlineStats reports how an online operation paused I/O.
type OnlineStats struct {
	// Pause is the longest single pause.
	Pause time.Duration
	// Pauses counts them.
	Pauses int
}

func (st *OnlineStats) observe(d time.Duration) {
	st.Pause = max(st.Pause, d)
	st.Pauses++
}

// checkOnline refuses online operations on a read-only or closed stack.
func (s *Stack) checkOnline(op string) error {
	if s.readOnly {
		return fmt.Errorf("%s %s: stack is open read-only: %w", op, s.dir, unix.EPERM)
	}
	if s.closed {
		return fmt.Errorf("%s %s: %w", op, s.dir, os.ErrClosed)
	}
	return nil
}

// Snapshot freezes the current state of the open stack under a new GUID
// and continues on a new, empty top delta; it returns the GUID. The new
// delta and the new descriptor are written and the old top flushed before
// I/O pauses; the pause covers a flush of what the old top took since
// (little), the descriptor's rename and the switch of the chain in memory.
// The rename is made durable after I/O resumed; flushes wait for that (see
// descSync). The old top then keeps
// serving reads through its writable handle until a read-only one replaces
// it, and is closed cleanly (its in-use mark cleared, so that the frozen
// delta passes qemu-img check) before Snapshot returns. A GUID returned
// with an error means the snapshot exists but that last step failed: the
// frozen delta needs `check --repair` once the stack is closed.
func (s *Stack) Snapshot() (_ string, st OnlineStats, _ error) {
	s.online.Lock()
	defer s.online.Unlock()
	if err := s.checkOnline("snapshot"); err != nil {
		return "", st, err
	}
	if len(s.chain) >= MaxChain {
		return "", st, fmt.Errorf("snapshot %s: %w", s.dir, ErrChainFull)
	}
	name, err := newDeltaFile(s.dir)
	if err != nil {
		return "", st, fmt.Errorf("snapshot %s: %w", s.dir, err)
	}
	path := filepath.Join(s.dir, name)
	// The online lock keeps the size stable: only Grow changes it.
	newTop, err := Create(path, CreateOptions{Size: s.Size(), ClusterSize: s.cs, Direct: s.direct, faults: s.faults})
	if err != nil {
		return "", st, fmt.Errorf("snapshot %s: %w", s.dir, err)
	}
	discardNew := func() {
		newTop.Close()
		os.Remove(path)
	}
	// Most dirty data becomes durable here, so that the clean close of
	// the frozen delta below is short.
	if err := s.top().Flush(); err != nil {
		discardNew()
		return "", st, fmt.Errorf("snapshot %s: %w", s.dir, err)
	}
	guid := NewGUID()
	old := s.chain[len(s.chain)-1]
	chain := append([]DescriptorImg(nil), s.chain...)
	chain[len(chain)-1].GUID = guid
	chain = append(chain, DescriptorImg{GUID: old.GUID, Type: TypeCompressed, File: name})
	nd := s.desc.clone()
	for i := range nd.Snapshots.Shots {
		if nd.Snapshots.Shots[i].GUID == old.GUID {
			nd.Snapshots.Shots[i].GUID = guid
		}
	}
	nd.setChain(chain)
	staged, err := s.stageDescriptor(nd)
	if err != nil {
		discardNew()
		return "", st, fmt.Errorf("snapshot %s: %w", s.dir, err)
	}

	s.descSync.Lock()
	t0 := time.Now()
	s.io.Lock()
	frozen := s.top()
	// What the old top acknowledged since the flush above must be
	// durable before the descriptor can make it a snapshot: a power loss
	// must not find the snapshot without it.
	err = frozen.Flush()
	if err == nil {
		err = staged.rename()
	}
	if err == nil {
		s.layers = append(s.layers, newTop)
		s.chain, s.desc = chain, nd
	}
	s.io.Unlock()
	st.observe(time.Since(t0))
	if err != nil {
		s.descSync.Unlock()
		staged.discard()
		discardNew()
		return "", st, fmt.Errorf("snapshot %s: %w", s.dir, err)
	}
	err = staged.sync()
	s.descSync.Unlock()
	if err != nil {
		return guid, st, fmt.Errorf("snapshot %s: %w", s.dir, err)
	}
	if err := s.reopenFrozen(len(chain)-2, frozen, &st); err != nil {
		return guid, st, fmt.Errorf("snapshot %s: taken, but %w", s.dir, err)
	}
	return guid, st, nil
}

// stageDescriptor stages d for this stack (see stagedDescriptor).
func (s *Stack) stageDescriptor(d *Descriptor) (*stagedDescriptor, error) {
	sd, err := stageDescriptor(s.dir, d)
	if err == nil {
		sd.faults = s.faults
	}
	return sd, err
}

// reopenFrozen replaces layer k, still open through the writable handle w
// it had as the top, by a read-only handle, then closes w cleanly. Until
// then w serves the layer's reads; if the read-only open fails it goes on
// doing so, and a clean close of the stack closes it.
func (s *Stack) reopenFrozen(k int, w Disk, st *OnlineStats) error {
	ro, err := openLayer(s.dir, s.chain[k], s.layerOptions(true), s.Size(), s.cs)
	if err != nil {
		return fmt.Errorf("the frozen delta could not be reopened read-only: %w", err)
	}
	t0 := time.Now()
	s.io.Lock()
	s.layers[k] = ro
	s.io.Unlock()
	st.observe(time.Since(t0))
	if err := w.Close(); err != nil {
		return fmt.Errorf("the frozen delta was not closed cleanly (run check --repair on the stack once it is closed): %w", err)
	}
	return nil
}

// reopenTop opens the top delta for writing again after a failed switch;
// if that fails too the stack is closed.
func (s *Stack) reopenTop(cause error) error {
	l, err := openLayer(s.dir, s.chain[len(s.chain)-1], s.layerOptions(false), s.Size(), s.cs)
	if err != nil {
		s.layers = s.layers[:len(s.layers)-1]
		s.closeAll()
		s.closed = true
		return errors.Join(cause, fmt.Errorf("reopen the top delta: %w", err))
	}
	s.layers[len(s.layers)-1] = l
	return cause
}

// DeleteSnapshot removes snapshot guid from the open stack by merging its
// delta into the delta above it, as the offline DeleteSnapshot does. The
// clusters are copied while I/O continues: a cluster the upper delta lacks
// reads the same from the snapshot's delta before and after the copy, and
// copies into the top delta take the same per-cluster lock as the copy-up
// of a guest write, so a write to that cluster either lands after the copy
// or makes the copy unnecessary. I/O pauses only for the descriptor switch.
func (s *Stack) DeleteSnapshot(guid string) (OnlineStats, error) {
	var st OnlineStats
	s.online.Lock()
	defer s.online.Unlock()
	if err := s.checkOnline("delete snapshot"); err != nil {
		return st, err
	}
	k := indexOf(s.chain, guid)
	switch {
	case k < 0:
		return st, fmt.Errorf("delete snapshot %s in %s: no such snapshot: %w", guid, s.dir, os.ErrNotExist)
	case k == len(s.chain)-1:
		return st, fmt.Errorf("delete snapshot %s in %s: it is the top delta, not a snapshot: %w", guid, s.dir, unix.EINVAL)
	}
	fail := func(err error) (OnlineStats, error) {
		return st, fmt.Errorf("delete snapshot %s in %s: %w", guid, s.dir, err)
	}
	upperIsTop := k+1 == len(s.chain)-1
	var dst, upper *Image
	if upperIsTop {
		dst = s.topImage()
	} else {
		// Nobody else writes a delta below the top: a second, writable
		// handle fills it while the stack keeps reading through its own
		// read-only one (whose BAT does not see the new clusters, which
		// read the same through the snapshot's delta).
		if s.chain[k+1].Type != TypeCompressed {
			return fail(fmt.Errorf("delta %s is not a ploop image: %w", s.chain[k+1].File, ErrCorrupt))
		}
		img, err := Open(filepath.Join(s.dir, s.chain[k+1].File), s.layerOptions(false))
		if err != nil {
			return fail(err)
		}
		upper, dst = img, img
	}
	if err := s.foldOnline(s.layers[k], dst, k == 0, upperIsTop); err != nil {
		if upper != nil {
			upper.Close()
		}
		return fail(err)
	}
	var reopened Disk
	if upper != nil {
		// A clean close clears inuse; the fresh read-only handle sees
		// the copied clusters.
		if err := upper.Close(); err != nil {
			return fail(err)
		}
		l, err := openLayer(s.dir, s.chain[k+1], s.layerOptions(true), s.Size(), s.cs)
		if err != nil {
			return fail(err)
		}
		reopened = l
	} else if err := dst.Flush(); err != nil {
		return fail(err)
	}

	chain := append(append([]DescriptorImg(nil), s.chain[:k]...), s.chain[k+1:]...)
	nd := s.desc.clone()
	nd.setChain(chain)
	removed := s.chain[k : k+1]
	staged, err := s.stageDescriptor(nd)
	if err != nil {
		if reopened != nil {
			reopened.Close()
		}
		return fail(err)
	}
	var retired []Disk
	s.descSync.Lock()
	t0 := time.Now()
	s.io.Lock()
	err = staged.rename()
	if err == nil {
		retired = append(retired, s.layers[k])
		layers := append([]Disk(nil), s.layers[:k]...)
		if reopened != nil {
			retired = append(retired, s.layers[k+1])
			layers = append(layers, reopened)
			layers = append(layers, s.layers[k+2:]...)
		} else {
			layers = append(layers, s.layers[k+1:]...)
		}
		s.layers, s.chain, s.desc = layers, chain, nd
	}
	s.io.Unlock()
	st.observe(time.Since(t0))
	if err != nil {
		s.descSync.Unlock()
		staged.discard()
		if reopened != nil {
			reopened.Close()
		}
		return fail(err)
	}
	err = staged.sync()
	s.descSync.Unlock()
	for _, l := range retired {
		l.Close()
	}
	if err != nil {
		// Switched, but the directory fsync failed: the merged delta
		// stays on disk until a repair removes it as an orphan.
		return fail(err)
	}
	if err := removeDeltas(s.dir, removed, nil); err != nil {
		return fail(err)
	}
	return st, nil
}

// foldOnline copies into dst every cluster that src has and dst lacks.
// With lockTop, dst is the stack's top delta and each cluster is copied
// under the cluster lock guest writes take for their copy-ups.
func (s *Stack) foldOnline(src Disk, dst *Image, becomesBase, lockTop bool) error {
	size := src.Size()
	buf := make([]byte, s.cs)
	for start := int64(0); start < size; start += s.cs {
		var lk *sync.Mutex
		if lockTop {
			lk = &s.clusterLocks[(start/s.cs)%clusterLockStripes]
			lk.Lock()
		}
		err := foldCluster(src, dst, buf[:min(s.cs, size-start)], start, becomesBase)
		if lk != nil {
			lk.Unlock()
		}
		if err != nil {
			return err
		}
	}
	return dst.Flush()
}

// Grow sets a larger virtual size on the open stack, as GrowStack does
// offline: the descriptor first, then the top delta. I/O never pauses,
// not even for the relocation of the first data clusters when the top's
// BAT must grow into them (it waits out the reads of those places before
// they become BAT, see grace). A raw top pauses I/O to be reopened. The NBD server
// reads the size per request; clients that cached it at the handshake,
// and the kernel (see nbd.Attachment.Resize), must be told.
func (s *Stack) Grow(size int64) (st OnlineStats, _ error) {
	s.online.Lock()
	defer s.online.Unlock()
	if err := s.checkOnline("grow"); err != nil {
		return st, err
	}
	sectors := (uint64(size) + SectorSize - 1) / SectorSize
	if size <= 0 || sectors < s.desc.Params.DiskSize {
		return st, fmt.Errorf("grow %s to %d: smaller than the current size %d: %w", s.dir, size, s.Size(), unix.EINVAL)
	}
	nd := s.desc.clone()
	nd.setSize(sectors)
	newSize := nd.Size()
	// From here a crash leaves a descriptor larger than the top, which
	// RepairStack completes.
	if err := writeDescriptor(s.dir, nd, nil); err != nil {
		return st, fmt.Errorf("grow %s: %w", s.dir, err)
	}
	var err error
	if img, ok := s.top().(*Image); ok {
		// Requests check their range against the size once, so the
		// switch to the larger size needs no pause.
		if err = img.grow(newSize, s.inflight.wait); err != nil && img.Size() == s.Size() {
			// The top did not change: put the old size back.
			if rerr := writeDescriptor(s.dir, s.desc, nil); rerr != nil {
				err = errors.Join(err, fmt.Errorf("restore the descriptor: %w", rerr))
			}
		}
		if err == nil {
			s.desc = nd
			s.size.Store(newSize)
		}
	} else {
		// A raw top (a one-delta stack with a raw base) is closed,
		// truncated and reopened: O(1).
		t0 := time.Now()
		s.io.Lock()
		if err = s.growRawTop(newSize); err == nil {
			s.desc = nd
			s.size.Store(newSize)
		}
		s.io.Unlock()
		st.observe(time.Since(t0))
	}
	if err != nil {
		return st, fmt.Errorf("grow %s: %w", s.dir, err)
	}
	return st, nil
}

// growRawTop grows the raw top delta. The caller holds io exclusively.
func (s *Stack) growRawTop(size int64) error {
	top := s.chain[len(s.chain)-1]
	if err := s.top().Close(); err != nil {
		return s.reopenTop(err)
	}
	if err := growTop(s.dir, top, size); err != nil {
		return s.reopenTop(err)
	}
	l, err := openLayer(s.dir, top, s.layerOptions(false), size, s.cs)
	if err != nil {
		s.layers = s.layers[:len(s.layers)-1]
		s.closeAll()
		s.closed = true
		return fmt.Errorf("reopen the grown top delta: %w", err)
	}
	s.layers[len(s.layers)-1] = l
	return nil
}

// Compact compacts the top delta of the open stack as CompactStack does
// offline, while I/O continues (see Image.compact); an all-zero cluster of
// the top is unallocated only where the deltas below read as zeros too
// (they are immutable, so that is known once). It does not pause I/O. A
// raw top is left as it is.
func (s *Stack) Compact() (res CompactResult, st OnlineStats, _ error) {
	s.online.Lock()
	defer s.online.Unlock()
	if err := s.checkOnline("compact"); err != nil {
		return res, st, err
	}
	img, ok := s.top().(*Image)
	if !ok {
		return res, st, nil
	}
	res, err := img.compact(s.readsNonZero(len(s.layers)-2), s.inflight.wait)
	if err != nil {
		return res, st, fmt.Errorf("compact %s: %w", s.dir, err)
	}
	return res, st, nil
}
