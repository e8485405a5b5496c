package ploop

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// Compaction gives the filesystem back the space of clusters that hold
// nothing: all-zero clusters are unallocated (their BAT entry cleared, made
// durable, then the hole punched), and the clusters at the end of the file
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
// standalone image). The image must have no I/O in flight; an online
// caller pauses its server around the call.
func (img *Image) Compact() (CompactResult, error) { return img.compact(nil, nil) }

// compact does the work; lowerNonZero, when not nil, reports whether the
// deltas below would read anything but zeros in virtual cluster i, in which
// case an all-zero cluster i must stay allocated to hide them. only, when
// not nil, limits the zero scan to those virtual clusters (see
// zeroCandidates).
func (img *Image) compact(lowerNonZero func(i int64) (bool, error), only []int64) (CompactResult, error) {
	var res CompactResult
	if img.readOnly {
		return res, fmt.Errorf("compact %s: image is read-only: %w", img.path, unix.EPERM)
	}
	img.flushMu.Lock()
	defer img.flushMu.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	fail := func(err error) (CompactResult, error) {
		return res, fmt.Errorf("compact %s: %w", img.path, err)
	}
	var err error
	if res.FileSizeBefore, err = img.s.Size(); err != nil {
		return fail(err)
	}
	// The BAT on disk must be current before entries change.
	if err := img.syncMetaLocked(); err != nil {
		return fail(err)
	}
	if err := img.unallocateZeros(lowerNonZero, only, &res); err != nil {
		return fail(err)
	}
	if res.ZeroClusters > 0 {
		if err := img.syncMetaLocked(); err != nil {
			return fail(err)
		}
		img.hooks.at("compact-zeros-unmapped")
		// No holes are punched: every cluster freed here is either
		// filled by a move below or cut off by the truncation.
	}
	end, moves := img.planCompaction()
	res.MovedClusters = int64(len(moves))
	if err := img.moveClusters(moves, "compact"); err != nil {
		return fail(err)
	}
	// Only unreferenced clusters lie past end now.
	if err := img.s.Truncate(end); err != nil {
		return fail(fmt.Errorf("truncate to %d: %w", end, err))
	}
	img.hooks.at("compact-truncated")
	if err := img.s.Sync(); err != nil {
		return fail(err)
	}
	img.next = end
	res.FileSizeAfter = end
	return res, nil
}

// unallocateZeros clears the BAT entry (in memory) of every all-zero
// cluster that may go, among only if it is not nil. The caller holds mu.
func (img *Image) unallocateZeros(lowerNonZero func(i int64) (bool, error), only []int64, res *CompactResult) error {
	buf, zeros := make([]byte, img.cs), make([]byte, img.cs)
	n := int64(img.hdr.BATEntries)
	if only != nil {
		n = int64(len(only))
	}
	for k := range n {
		i := k
		if only != nil {
			i = only[k]
		}
		host := img.entry(i)
		if host == 0 {
			continue
		}
		zero, err := img.clusterIsZero(buf, zeros, host)
		if err != nil {
			return fmt.Errorf("read cluster %d: %w", i, err)
		}
		if !zero {
			continue
		}
		if lowerNonZero != nil {
			keep, err := lowerNonZero(i)
			if err != nil {
				return fmt.Errorf("read below cluster %d: %w", i, err)
			}
			if keep {
				res.KeptZeroClusters++
				continue
			}
		}
		img.setEntry(i, 0)
		res.ZeroClusters++
	}
	return nil
}

// zeroCandidates lists the allocated clusters that read as zeros and are
// not needed to hide lower data (lowerNonZero, as for compact), and counts
// the zero ones that are. It runs while I/O continues, so the answer may
// be stale by the time it is used: the caller re-checks the candidates
// with I/O stopped (a cluster written meanwhile is then kept; one zeroed
// meanwhile is compacted next time). Only the BAT lookups lock.
func (img *Image) zeroCandidates(lowerNonZero func(i int64) (bool, error)) (only []int64, kept int64, _ error) {
	buf, zeros := make([]byte, img.cs), make([]byte, img.cs)
	only = []int64{}
	for i := range int64(img.hdr.BATEntries) {
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
// area, highest first, with the free clusters below it, lowest first, and
// returns that end. The caller holds mu.
func (img *Image) planCompaction() (int64, []clusterMove) {
	cs := img.cs
	start := (int64(img.hdr.DataOff)*SectorSize + cs - 1) / cs * cs
	type used struct{ i, host int64 }
	var all []used
	for i := range int64(img.hdr.BATEntries) {
		if host := img.entry(i); host != 0 {
			all = append(all, used{i, host})
		}
	}
	slices.SortFunc(all, func(a, b used) int { return int(a.host/cs - b.host/cs) })
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
		moves = append(moves, clusterMove{all[k].i, all[k].host, holes[len(moves)]})
	}
	return end, moves
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
	below := &Stack{dir: dir, readOnly: true, chain: chain[:len(chain)-1], size: d.Size(), cs: d.ClusterSize()}
	defer below.closeAll()
	for _, im := range below.chain {
		l, err := openLayer(dir, im, OpenOptions{ReadOnly: true}, below.size, below.cs)
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
	var lowerNonZero func(i int64) (bool, error)
	if len(below.layers) > 0 {
		buf := make([]byte, below.cs)
		lowerNonZero = func(i int64) (bool, error) {
			off := i * below.cs
			n := min(below.cs, img.Size()-off)
			if n <= 0 {
				return false, nil
			}
			b := buf[:n]
			if err := below.readLayer(len(below.layers)-1, b, off); err != nil {
				return false, err
			}
			return !allZero(b), nil
		}
	}
	res, err = img.compact(lowerNonZero, nil)
	if err != nil {
		img.Close()
		return res, fmt.Errorf("compact %s: %w", dir, err)
	}
	if err := img.Close(); err != nil {
		return res, fmt.Errorf("compact %s: %w", dir, err)
	}
	return res, nil
}
