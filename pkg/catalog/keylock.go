package catalog

import (
	"context"
	"fmt"
	"sync"
)

// keyLocks serialises the operations on one name, volume or snapshot while
// operations on others (long merges, copies) run in parallel. A waiter
// gives up when its context ends.
type keyLocks struct {
	mu sync.Mutex
	m  map[string]*keyLock
}

type keyLock struct {
	ch   chan struct{} // holds a token while locked
	refs int
}

// lock takes key; it returns the unlock function, or ErrBusy once ctx ends
// before the key is free.
func (k *keyLocks) lock(ctx context.Context, key string) (func(), error) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyLock{}
	}
	l := k.m[key]
	if l == nil {
		l = &keyLock{ch: make(chan struct{}, 1)}
		k.m[key] = l
	}
	l.refs++
	k.mu.Unlock()
	release := func() {
		k.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
	select {
	case l.ch <- struct{}{}:
	case <-ctx.Done():
		release()
		return nil, fmt.Errorf("waiting for %s: %w: %w", key, ErrBusy, ctx.Err())
	}
	return func() {
		<-l.ch
		release()
	}, nil
}
