package ploop

import (
	"fmt"
	"math"
	"slices"

	"golang.org/x/sys/unix"
)

// Moving data clusters inside one image (relocating grow and compaction)
// follows the format's consistency rule at every step: the copy is written
// to a cluster no BAT entry refers to and made durable, then the BAT entry
// is switched and made durable, and only then is the old copy given up. A
// crash before the switch leaves an unreferenced copy (a leak or an unused
// interior cluster, both harmless and trimmed by Repair); a crash after it
// leaves the old cluster unreferenced. Either way every BAT entry points at
// the cluster's contents, so the image reads the same.
//
// These operations need the image to themselves: the caller must stop all
// I/O on it (an online caller pauses the server first).

// clusterMove is one cluster to copy: virtual cluster i from host offset
// from to host offset to.
type clusterMove struct{ i, from, to int64 }

// moveBatchBytes bounds how much data is copied between two fsyncs.
const moveBatchBytes = 64 << 20

// syncMetaLocked makes the BAT on disk equal to img.meta: the data first,
// then the dirty BAT blocks, then an fsync. The caller holds mu and
// flushMu.
func (img *Image) syncMetaLocked() error {
	if err := img.s.Sync(); err != nil {
		return err
	}
	return img.writeBATLocked()
}

// writeBATLocked writes the dirty BAT blocks and fsyncs; the data they
// refer to must be durable already. The caller holds mu and flushMu.
func (img *Image) writeBATLocked() error {
	if len(img.dirty) == 0 {
		return nil
	}
	blocks := make([]int64, 0, len(img.dirty))
	for b := range img.dirty {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	for _, b := range blocks {
		start := b * metaBlock
		end := min(start+metaBlock, int64(len(img.meta)))
		if _, err := img.s.WriteAt(img.meta[start:end], start); err != nil {
			return fmt.Errorf("write BAT block %d: %w", b, err)
		}
	}
	if err := img.s.Sync(); err != nil {
		return err
	}
	clear(img.dirty)
	return nil
}

// moveClusters copies each cluster to its new place and switches its BAT
// entry, in batches: copies, fsync, BAT entries, fsync. The destinations
// must be unreferenced and inside the file. The caller holds mu and
// flushMu.
func (img *Image) moveClusters(moves []clusterMove, point string) error {
	buf := make([]byte, img.cs)
	batch := max(1, int(moveBatchBytes/img.cs))
	for len(moves) > 0 {
		n := min(batch, len(moves))
		for _, m := range moves[:n] {
			if err := img.readHost(buf, m.from); err != nil {
				return fmt.Errorf("read cluster %d at %d: %w", m.i, m.from, err)
			}
			// Detach whatever pages the destination had (a freed zero
			// cluster may still be referenced by a spliced read
			// reply; see fileread.go), so the copy lands in fresh ones.
			if err := img.s.PunchHole(m.to, img.cs); err != nil {
				return fmt.Errorf("clear cluster at %d for %d: %w", m.to, m.i, err)
			}
			if _, err := img.s.WriteAt(buf, m.to); err != nil {
				return fmt.Errorf("copy cluster %d to %d: %w", m.i, m.to, err)
			}
			img.hooks.at(point + "-copy")
		}
		if err := img.s.Sync(); err != nil {
			return err
		}
		img.hooks.at(point + "-copied")
		for _, m := range moves[:n] {
			img.setEntry(m.i, m.to)
		}
		if err := img.writeBATLocked(); err != nil {
			return err
		}
		img.hooks.at(point + "-switched")
		moves = moves[n:]
	}
	return nil
}

// relocateForBAT makes room for a BAT of the given number of entries: the
// data clusters between the current data_off and the one that BAT needs
// move to the end of the file, and the file is made at least that long. It
// returns the new data_off in sectors; the header is not changed (Grow
// writes it once the new BAT space is zeroed). The caller holds mu and
// flushMu.
func (img *Image) relocateForBAT(entries uint64) (uint32, error) {
	cs := img.cs
	newStart := (HeaderSize + 4*int64(entries) + cs - 1) / cs * cs
	if newStart/SectorSize > math.MaxUint32 {
		return 0, fmt.Errorf("a BAT of %d entries does not fit data_off: %w", entries, unix.EFBIG)
	}
	// The BAT on disk must be current before entries move.
	if err := img.syncMetaLocked(); err != nil {
		return 0, err
	}
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	next := max(img.next, newStart)
	var moves []clusterMove
	for i := range int64(img.hdr.BATEntries) {
		if host := img.entry(i); host != 0 && host < newStart {
			if _, ok := img.hdr.offsetToEntry(next); !ok {
				return 0, fmt.Errorf("file offset %d is past what the BAT can address: %w", next, unix.EFBIG)
			}
			moves = append(moves, clusterMove{i, host, next})
			next += cs
		}
	}
	size, err := img.s.Size()
	if err != nil {
		return 0, err
	}
	if size < next {
		if err := img.s.Truncate(next); err != nil {
			return 0, err
		}
	}
	img.next = next
	if err := img.moveClusters(moves, "grow-relocate"); err != nil {
		return 0, err
	}
	// The old places are unreferenced now: give their space back (the
	// part the new BAT covers is written with zeros by Grow).
	for _, m := range moves {
		if err := img.s.PunchHole(m.from, cs); err != nil {
			return 0, fmt.Errorf("free cluster at %d: %w", m.from, err)
		}
	}
	return uint32(newStart / SectorSize), nil
}
