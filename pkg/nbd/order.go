package nbd

import (
	"math"
	"sync"
)

// writeOrder runs the overlapping writes (WRITE, TRIM, WRITE_ZEROES) of
// one export in the order they arrived, whichever connection brought
// them.
//
// This is what makes a resent request harmless. The kernel resends a
// request that timed out on another connection while the first copy may
// still be running here (see the package documentation). The copy that
// arrived first is ordered first, so the resent copy waits for it, and
// the write the filesystem issues after the resent copy was acknowledged
// waits for both: a stale copy can never land after a newer write. A
// copy that is read only after the kernel gave up on its connection is
// dropped before it is ordered at all (conn.peerGone).
type writeOrder struct {
	mu     sync.Mutex
	active []*pendingWrite // unordered; every entry arrived before any newcomer
}

// pendingWrite is a write that has arrived and not finished.
type pendingWrite struct {
	off, end uint64
	idx      int
	// done is made when a later write has to wait for this one, and
	// closed when this one finishes.
	done chan struct{}
	// after are the done channels of the earlier overlapping writes.
	after []chan struct{}
}

// enter registers a write of [off, off+length) as arrived now. A
// zero-length write overlaps nothing and is not registered (nil).
func (o *writeOrder) enter(off uint64, length uint32) *pendingWrite {
	if length == 0 {
		return nil
	}
	end := off + uint64(length)
	if end < off {
		end = math.MaxUint64
	}
	w := &pendingWrite{off: off, end: end}
	o.mu.Lock()
	for _, q := range o.active {
		if q.off < end && off < q.end {
			if q.done == nil {
				q.done = make(chan struct{})
			}
			w.after = append(w.after, q.done)
		}
	}
	w.idx = len(o.active)
	o.active = append(o.active, w)
	o.mu.Unlock()
	return w
}

// wait blocks until every earlier overlapping write has finished. It
// gives up, returning false, when stop is closed first.
func (w *pendingWrite) wait(stop <-chan struct{}) bool {
	if w == nil {
		return true
	}
	for len(w.after) > 0 {
		select {
		case <-w.after[0]:
			w.after = w.after[1:]
		case <-stop:
			return false
		}
	}
	return true
}

// leave ends a write (done, failed or dropped), letting later
// overlapping ones run. A nil write is ignored.
func (o *writeOrder) leave(w *pendingWrite) {
	if w == nil {
		return
	}
	o.mu.Lock()
	last := len(o.active) - 1
	o.active[w.idx] = o.active[last]
	o.active[w.idx].idx = w.idx
	o.active[last] = nil
	o.active = o.active[:last]
	done := w.done
	o.mu.Unlock()
	if done != nil {
		close(done)
	}
}
