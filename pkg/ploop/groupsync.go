package ploop

import "sync"

// groupSync shares fdatasync calls between concurrent callers. A caller
// needs a sync that starts after its own writes completed: if none is
// running it starts one; if one is running (it may have started before the
// caller's writes), the caller joins the next one, which starts when the
// running one ends and covers everybody who joined it. Under load this
// turns N concurrent flushes or ordered allocations into about two syncs.
type groupSync struct {
	mu      sync.Mutex
	running bool
	next    *syncRound // the round waiting for the running one to end
}

type syncRound struct {
	done chan struct{}
	err  error
}

// Sync calls sync, or waits for a call of it that started after Sync was
// called, and returns that call's error.
func (g *groupSync) Sync(sync func() error) error {
	g.mu.Lock()
	if !g.running {
		g.running = true
		g.mu.Unlock()
		r := &syncRound{done: make(chan struct{})}
		g.run(r, sync)
		return r.err
	}
	if g.next == nil {
		g.next = &syncRound{done: make(chan struct{})}
	}
	r := g.next
	g.mu.Unlock()
	<-r.done
	return r.err
}

// run performs round r and then, in a new goroutine so that r's caller
// returns at once, the round that queued up meanwhile.
func (g *groupSync) run(r *syncRound, sync func() error) {
	r.err = sync()
	close(r.done)
	g.mu.Lock()
	next := g.next
	g.next = nil
	g.running = next != nil
	g.mu.Unlock()
	if next != nil {
		go g.run(next, sync)
	}
}
