package ploop

import (
	"sync"
	"sync/atomic"
)

// grace lets an online operation wait for the requests that were in flight
// at some point without stopping new ones: a request enters the current
// epoch and leaves it when done; wait starts a new epoch and returns when
// the old one has drained. An operation that changed the BAT and is about
// to reuse the file range it freed waits so, because a request that looked
// up the old mapping before the change may still be reading that range;
// requests that start later see the new mapping. Two epochs suffice since
// waits do not overlap.
type grace struct {
	epoch atomic.Uint32
	count [2]atomic.Int64
	// serial orders waits; mu guards wake, the channel the last request
	// of a draining epoch closes.
	serial sync.Mutex
	mu     sync.Mutex
	wake   [2]chan struct{}
}

// enter registers a request; pass the result to exit.
func (g *grace) enter() uint32 {
	for {
		e := g.epoch.Load() & 1
		g.count[e].Add(1)
		if g.epoch.Load()&1 == e {
			return e
		}
		// A wait flipped the epoch meanwhile: join the new one rather
		// than delay the wait.
		g.exit(e)
	}
}

func (g *grace) exit(e uint32) {
	if g.count[e].Add(-1) == 0 {
		g.mu.Lock()
		if g.wake[e] != nil {
			close(g.wake[e])
			g.wake[e] = nil
		}
		g.mu.Unlock()
	}
}

// wait returns once every request that entered before the call has exited.
func (g *grace) wait() {
	g.serial.Lock()
	defer g.serial.Unlock()
	old := g.epoch.Load() & 1
	ch := make(chan struct{})
	g.mu.Lock()
	g.wake[old] = ch
	g.mu.Unlock()
	g.epoch.Add(1)
	if g.count[old].Load() == 0 {
		g.mu.Lock()
		g.wake[old] = nil
		g.mu.Unlock()
		return
	}
	<-ch
}
