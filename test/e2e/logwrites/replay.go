package logwrites

import (
	"fmt"
	"io"
)

// replayChunk bounds the buffer a Replayer copies data through.
const replayChunk = 1 << 20

// Replayer applies a log's entries in order onto a copy of the data
// device's initial contents. It only moves forward: to check several
// points, replay to each in increasing order and copy the device between.
type Replayer struct {
	log     *Log
	dst     io.WriterAt
	devSize int64
	next    int
	buf     []byte
}

// NewReplayer replays l onto dst, a device (or image file) of devSize bytes
// that holds what the data device held when logging started. Entries that
// reach past devSize are an error.
func (l *Log) NewReplayer(dst io.WriterAt, devSize int64) *Replayer {
	return &Replayer{log: l, dst: dst, devSize: devSize}
}

// Applied is the number of entries applied so far: dst is the device as
// it was once entries 0..Applied()-1 were durable.
func (r *Replayer) Applied() int { return r.next }

// ReplayTo applies entries up to (not including) entry n, so that the
// first n entries are applied. n may equal len(Entries) (replay all); it
// may not be smaller than Applied().
func (r *Replayer) ReplayTo(n int) error {
	if n < r.next || n > len(r.log.Entries) {
		return fmt.Errorf("replay to entry %d: out of range (applied %d of %d)", n, r.next, len(r.log.Entries))
	}
	for ; r.next < n; r.next++ {
		if err := r.apply(r.next); err != nil {
			return err
		}
	}
	return nil
}

func (r *Replayer) apply(i int) error {
	e := r.log.Entries[i]
	ss := r.log.SectorSize
	if e.Sectors == 0 {
		return nil // a pure flush or a mark: nothing changes on the device
	}
	off, n := e.Offset(ss), e.Length(ss)
	if off > r.devSize || n > r.devSize-off {
		return fmt.Errorf("replay entry %d (%s): bytes %d+%d lie past the end of the %d-byte device", i, e, off, n, r.devSize)
	}
	if r.buf == nil {
		r.buf = make([]byte, replayChunk)
	}
	// A discarded range reads as zeros on the loop devices the tests
	// log; writing zeros gives the same contents on any copy.
	discard := e.Flags&FlagDiscard != 0
	if discard {
		clear(r.buf)
	}
	for done := int64(0); done < n; {
		c := min(n-done, int64(len(r.buf)))
		b := r.buf[:c]
		if !discard {
			if _, err := r.log.r.ReadAt(b, e.dataOff+done); err != nil {
				return fmt.Errorf("replay entry %d (%s): read data: %w", i, e, err)
			}
		}
		if _, err := r.dst.WriteAt(b, off+done); err != nil {
			return fmt.Errorf("replay entry %d (%s): write: %w", i, e, err)
		}
		done += c
	}
	return nil
}
