package nbd

import "sync"

// byteBudget bounds the payload bytes one connection holds in buffers:
// write data read ahead of its turn and read data waiting to be sent.
// Without it a client could make the server hold maxInFlight requests of
// MaxPayload bytes each, 2 GiB per connection.
type byteBudget struct {
	mu sync.Mutex
	// max is the limit; 0 means none.
	max  int64
	used int64
	// peak is the most ever used, for tests.
	peak int64
	// waiting counts blocked acquirers, for tests.
	waiting int
	// wake is closed (and forgotten) when bytes are released while
	// someone waits.
	wake chan struct{}
}

// charge is what a buffer of capacity n counts against the budget. It is
// clamped to the limit so that a request larger than the limit can still
// run, once it has the connection to itself.
func (b *byteBudget) charge(n int) int64 {
	if b.max <= 0 {
		return 0
	}
	return min(int64(n), b.max)
}

// acquire takes n bytes, waiting while they would exceed the limit. It
// returns false, having taken nothing, when stop is closed first.
func (b *byteBudget) acquire(n int64, stop <-chan struct{}) bool {
	if n == 0 {
		return true
	}
	b.mu.Lock()
	for b.used+n > b.max {
		if b.wake == nil {
			b.wake = make(chan struct{})
		}
		wake := b.wake
		b.waiting++
		b.mu.Unlock()
		select {
		case <-wake:
		case <-stop:
			b.mu.Lock()
			b.waiting--
			b.mu.Unlock()
			return false
		}
		b.mu.Lock()
		b.waiting--
	}
	b.used += n
	b.peak = max(b.peak, b.used)
	b.mu.Unlock()
	return true
}

// release returns n bytes.
func (b *byteBudget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	if b.wake != nil {
		close(b.wake)
		b.wake = nil
	}
	b.mu.Unlock()
}

// state reports the bytes in use, the peak and the number of waiters.
func (b *byteBudget) state() (used, peak int64, waiting int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used, b.peak, b.waiting
}
