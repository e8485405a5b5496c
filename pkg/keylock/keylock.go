// Package keylock serialises operations on one key (a volume, a snapshot,
// a name) while operations on other keys run in parallel. A key's lock
// exists only while somebody holds or waits for it, so a long-lived
// process keeps no entry per volume it ever saw. Waiting ends with the
// caller's context, so one stuck operation makes later ones on its key
// fail instead of piling up behind it.
package keylock

import (
	"context"
	"sync"
)

// Locks is a set of per-key locks; the zero value is ready to use.
type Locks struct {
	mu sync.Mutex
	m  map[string]*entry
}

type entry struct {
	ch   chan struct{} // holds a token while locked
	refs int           // holders and waiters
}

func (k *Locks) ref(key string) *entry {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.m == nil {
		k.m = map[string]*entry{}
	}
	e := k.m[key]
	if e == nil {
		e = &entry{ch: make(chan struct{}, 1)}
		k.m[key] = e
	}
	e.refs++
	return e
}

func (k *Locks) unref(key string, e *entry) {
	k.mu.Lock()
	defer k.mu.Unlock()
	e.refs--
	if e.refs == 0 {
		delete(k.m, key)
	}
}

func (k *Locks) unlocker(key string, e *entry) func() {
	return func() {
		<-e.ch
		k.unref(key, e)
	}
}

// Lock takes key, waiting until ctx ends, and returns the unlock function;
// it fails with ctx's error when the key stays taken.
func (k *Locks) Lock(ctx context.Context, key string) (func(), error) {
	e := k.ref(key)
	select {
	case e.ch <- struct{}{}:
		return k.unlocker(key, e), nil
	case <-ctx.Done():
		k.unref(key, e)
		return nil, ctx.Err()
	}
}

// TryLock takes key if nobody holds it.
func (k *Locks) TryLock(key string) (func(), bool) {
	e := k.ref(key)
	select {
	case e.ch <- struct{}{}:
		return k.unlocker(key, e), true
	default:
		k.unref(key, e)
		return nil, false
	}
}

// held reports how many keys have an entry (for tests: none may leak).
func (k *Locks) held() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.m)
}
