package ploop

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// Compaction gives the filesystem back the space of clusters that hold
// nothing: all-zero clusters are unallocated (their BAT entry cleared and
// made durable), and the clusters at the end of the file
// move down into the free clusters below (see relocate.go for the order of
// writes), after which the file is truncated. Contents never change, so an
// image interrupted at any point is repaired (Repair, RepairStack) into one
// that reads exactly as before.

// CompactResult describes what a compaction did.
type CompactResult struct {
	// FileSizeBefore and FileSizeAfter are the image file's length.
	FileSizeBefore int64 `json:"file_size_before"`
	FileSizeAfter  int64 `json:"file_size_after"`
	// ZeroClusters were all-zero and are no longer allocated.
	ZeroClusters int64 `json:"zero_clusters"`
	// KeptZeroClusters are all-zero but stay allocated because the delta
	// below would show through them.
	KeptZeroClusters int64 `json:"kept_zero_clusters"`
	// MovedClusters were relocated into free clusters lower in the file.
	MovedClusters int64 `json:"moved_clusters"`
}

// Compact compacts a standalone image open for writing: every all-zero
// cluster is unallocated (which reads the same, as nothing lies below a
// standalone image). Writes may continue meanwhile, reads may not (an
// online caller goes through Stack.Compact, which waits out the reads of
// places before they are reused).
func (img *Image) Compact() (CompactResult, error) { return img.compact(nil, nil) }

// compactRounds bounds how often compaction plans again when writes
// allocated clusters past its end while it moved others.
const compactRounds = 4

// compact does the work; lowerNonZero, when not nil, reports whether the
// deltas below would read anything but zeros in virtual cluster i, in which
// case an all-zero cluster i must stay allocated to hide them. waitReads,
// when not nil, returns once every request that started before it has
// ended (see grace).
// Writes continue throughout: every step that depends on a cluster's
// contents or location holds its stripe lock.
func (img *Image) compact(lowerNonZero func(i int64) (bool, error), waitReads func()) (CompactResult, error) {
	var res CompactResult
	if img.readOnly {
		return res, fmt.Errorf("compact %s: image is read-only: %w", img.path, unix.EPERM)
	}
	if img.closed.Load() {
		return res, fmt.Errorf("compact %s: %w", img.path, os.ErrClosed)
	}
	img.maintMu.Lock()
	defer img.maintMu.Unlock()
	if waitReads == nil {
		waitReads = func() {}
	}
	fail := func(err error) (CompactResult, error) {
		return res, fmt.Errorf("compact %s: %w", img.path, err)
	}
	var err error
	if res.FileSizeBefore, err = img.s.Size(); err != nil {
		return fail(err)
	}
	only, kept, err := img.zeroCandidates(lowerNonZero)
	if err != nil {
		return fail(err)
	}
	res.KeptZeroClusters = kept
	img.hooks.at("compact-scanned")
	if res.ZeroClusters, err = img.unallocateZeros(only); err != nil {
		return fail(err)
	}
	if res.ZeroClusters > 0 {
		img.hooks.at("compact-zeros-unmapped")
	}
	for range compactRounds {
		end, moves := img.planCompaction()
		if len(moves) > 0 {
			// Reads of the freed places started before they were freed.
			waitReads()
			moved, err := img.moveClusters(moves, "compact")
			res.MovedClusters += moved
			if err != nil {
				return fail(err)
			}
		}
		// The switches are durable and nobody reads the old places
		// any more before the file is cut.
		if err := img.syncs.Sync(img.s.Sync); err != nil {
			return fail(err)
		}
		waitReads()
		cut, err := img.truncateTail(end)
		if err != nil {
			return fail(err)
		}
		img.hooks.at("compact-truncated")
		if cut == end {
			break
		}
	}
	if err := img.syncs.Sync(img.s.Sync); err != nil {
		return fail(err)
	}
	if res.FileSizeAfter, err = img.s.Size(); err != nil {
		return fail(err)
	}
	return res, nil
}

// unallocateZeros clears the BAT entries of the clusters in only that
// still read as zeros, and makes that durable before any of their places
// can be reused. Each cluster is checked again under its stripe lock: one
// written since the scan stays.
func (img *Image) unallocateZeros(only []int64) (int64, error) {
	buf, zeros := make([]byte, img.cs), make([]byte, img.cs)
	var n int64
	for len(only) > 0 {
		batch := only[:min(len(only), 256)]
		only = only[len(batch):]
		var blocks []int64
		for _, i := range batch {
			lk := &img.clusterLocks[i%clusterLockStripes]
			lk.Lock()
			host := img.lookup(i)
			zero := false
			var err error
			if host != 0 {
				zero, err = img.clusterIsZero(buf, zeros, host)
			}
			if err == nil && zero {
				img.mu.Lock()
				blocks = append(blocks, img.setEntry(i, 0))
				img.mu.Unlock()
				n++
			}
			lk.Unlock()
			if err != nil {
				return n, fmt.Errorf("read cluster %d: %w", i, err)
			}
		}
		if len(blocks) == 0 {
			continue
		}
		if err := img.writeBlocks(slices.Compact(blocks)); err != nil {
			return n, err
		}
		if err := img.syncs.Sync(img.s.Sync); err != nil {
			return n, err
		}
	}
	return n, nil
}

// zeroCandidates lists the allocated clusters that read as zeros and are
// not needed to hide lower data (lowerNonZero, as for compact), and counts
// the zero ones that are. It runs while I/O continues, so the answer may
// be stale by the time it is used: unallocateZeros checks each candidate
// again under its lock (a cluster written meanwhile is then kept; one
// zeroed meanwhile is compacted next time). Only the BAT lookups lock.
func (img *Image) zeroCandidates(lowerNonZero func(i int64) (bool, error)) (only []int64, kept int64, _ error) {
	buf, zeros := make([]byte, img.cs), make([]byte, img.cs)
	img.mu.RLock()
	entries := int64(img.hdr.BATEntries)
	img.mu.RUnlock()
	for i := range entries {
		host := img.lookup(i)
		if host == 0 {
			continue
		}
		zero, err := img.clusterIsZero(buf, zeros, host)
		if err != nil {
			return nil, 0, fmt.Errorf("read cluster %d: %w", i, err)
		}
		if !zero {
			continue
		}
		if lowerNonZero != nil {
			keep, err := lowerNonZero(i)
			if err != nil {
				return nil, 0, fmt.Errorf("read below cluster %d: %w", i, err)
			}
			if keep {
				kept++
				continue
			}
		}
		only = append(only, i)
	}
	return only, kept, nil
}

// clusterIsZero reports whether the host cluster reads as zeros; a cluster
// that is all holes in the file is known to be without reading it. zeros
// is a zero buffer as long as buf (bytes.Equal is much faster than a loop).
func (img *Image) clusterIsZero(buf, zeros []byte, host int64) (bool, error) {
	data, err := img.s.NextData(host)
	switch {
	case errors.Is(err, unix.ENXIO):
		return true, nil // no data up to the end of the file
	case err == nil && data >= host+img.cs:
		return true, nil
	}
	// Any other lseek error: fall back to reading.
	if err := img.readHost(buf, host); err != nil {
		return false, err
	}
	return bytes.Equal(buf, zeros), nil
}

// planCompaction pairs the clusters past the compacted end of the data
// area, highest first, with the free places below it, lowest first, and
// returns that end. Places reserved by allocations in flight count as used
// and stay where they are.
func (img *Image) planCompaction() (int64, []clusterMove) {
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	img.mu.RLock()
	defer img.mu.RUnlock()
	cs := img.cs
	start := (int64(img.hdr.DataOff)*SectorSize + cs - 1) / cs * cs
	type used struct{ i, host int64 } // i < 0: pending, cannot move
	var all []used
	for i := range int64(img.hdr.BATEntries) {
		if host := img.entry(i); host != 0 {
			all = append(all, used{i, host})
		}
	}
	for host := range img.pending {
		all = append(all, used{-1, host})
	}
	slices.SortFunc(all, func(a, b used) int { return cmp.Compare(a.host, b.host) })
	end := start + int64(len(all))*cs
	// Free slots below end, in order.
	var holes []int64
	slot := start
	for _, u := range all {
		for ; slot < u.host && slot < end; slot += cs {
			holes = append(holes, slot)
		}
		slot = max(slot, u.host+cs)
	}
	for ; slot < end; slot += cs {
		holes = append(holes, slot)
	}
	var moves []clusterMove
	for k := len(all) - 1; k >= 0 && len(moves) < len(holes); k-- {
		if all[k].host < end {
			break
		}
		if all[k].i >= 0 {
			moves = append(moves, clusterMove{all[k].i, all[k].host, holes[len(moves)]})
		}
	}
	return end, moves
}

// tailStep bounds how much of the file one step of truncateTail frees.
// The kernel holds the file's inode lock while it frees a range, and every
// write to the file waits for it: a single ftruncate that freed 1 GiB
// stalled all writers for 16 s on a busy ext4 (make bench). Steps of
// 8 MiB keep each stall to one small range.
const tailStep = 8 << 20

// truncateTail cuts the file after the last used place, but not below
// end, and sends new allocations there. It returns where it cut: past end
// when clusters were allocated past it meanwhile. The space is freed from
// the top down in tailStep holes while I/O and allocation go on (nothing
// points into the tail, and new reservations go past the old end); the
// final ftruncate then only sets the size.
func (img *Image) truncateTail(end int64) (int64, error) {
	img.allocMu.Lock()
	cut, size := img.usedEnd(end), img.next
	img.allocMu.Unlock()
	for hi := size; hi > cut; {
		lo := max(cut, hi-tailStep)
		if err := img.s.PunchHole(lo, hi-lo); err != nil {
			return 0, fmt.Errorf("free %d..%d: %w", lo, hi, err)
		}
		hi = lo
	}
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	if now := img.usedEnd(end); now > cut {
		// Reserved past the old end meanwhile: the file must keep them;
		// the caller's next round moves them down.
		return now, nil
	}
	// Clusters reserved past the old end meanwhile and discarded again
	// are cut off with the rest.
	if err := img.s.Truncate(cut); err != nil {
		return 0, fmt.Errorf("truncate to %d: %w", cut, err)
	}
	img.next = cut
	return cut, nil
}

// usedEnd is where the used part of the file ends, but not below end: past
// the last allocated cluster and the last pending reservation. The caller
// holds allocMu.
func (img *Image) usedEnd(end int64) int64 {
	cut := end
	img.mu.RLock()
	for i := range int64(img.hdr.BATEntries) {
		if host := img.entry(i); host != 0 {
			cut = max(cut, host+img.cs)
		}
	}
	img.mu.RUnlock()
	for host := range img.pending {
		cut = max(cut, host+img.cs)
	}
	return cut
}

// CompactStack compacts the top delta of the (not served) stack in dir.
// An all-zero cluster of the top is unallocated only where the deltas
// below read as zeros too, so the volume reads the same; the deltas below
// are immutable and are not touched. A raw ("Plain") top is left as it is.
func CompactStack(dir string) (CompactResult, error) { return compactStack(dir, nil) }

func compactStack(dir string, h *hooks) (CompactResult, error) {
	var res CompactResult
	unlock, err := lockDir(dir)
	if err != nil {
		return res, fmt.Errorf("compact %s: %w", dir, err)
	}
	defer unlock()
	d, err := ReadDescriptor(dir)
	if err != nil {
		return res, fmt.Errorf("compact: %w", err)
	}
	chain := d.Chain()
	top := chain[len(chain)-1]
	if top.Type == TypePlain {
		return res, nil
	}
	if err := ensureClean(dir, top); err != nil {
		return res, fmt.Errorf("compact %s: %w", dir, err)
	}
	below := &Stack{dir: dir, readOnly: true, chain: chain[:len(chain)-1], cs: d.ClusterSize()}
	below.size.Store(d.Size())
	defer below.closeAll()
	for _, im := range below.chain {
		l, err := openLayer(dir, im, OpenOptions{ReadOnly: true}, below.Size(), below.cs)
		if err != nil {
			return res, fmt.Errorf("compact %s: %w", dir, err)
		}
		below.layers = append(below.layers, l)
	}
	img, err := Open(filepath.Join(dir, top.File), OpenOptions{})
	if err != nil {
		return res, fmt.Errorf("compact %s: %w", dir, err)
	}
	img.hooks = h
	res, err = img.compact(below.readsNonZero(len(below.layers)-1), nil)
	if err != nil {
		img.Close()
		return res, fmt.Errorf("compact %s: %w", dir, err)
	}
	if err := img.Close(); err != nil {
		return res, fmt.Errorf("compact %s: %w", dir, err)
	}
	return res, nil
}
