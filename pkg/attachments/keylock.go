package attachments

import (
	"context"
	"fmt"
	"sync"
)

// keyLocks serialises the operations on one volume while operations on
// different volumes run in parallel. Waiting for a lock ends with the
// caller's context, so a stuck operation on a volume makes later ones on
// it fail with ErrBusy instead of piling up.
type keyLocks struct {
	mu sync.Mutex
	m  map[string]*keyLock
}

type keyLock struct {
	ch   chan struct{} // holds a token while locked
	refs int
}

func (k *keyLocks) ref(key string) *keyLock {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.m == nil {
		k.m = map[string]*keyLock{}
	}
	l := k.m[key]
	if l == nil {
		l = &keyLock{ch: make(chan struct{}, 1)}
		k.m[key] = l
	}
	l.refs++
	return l
}

func (k *keyLocks) unref(key string, l *keyLock) {
	k.mu.Lock()
	defer k.mu.Unlock()
	l.refs--
	if l.refs == 0 {
		delete(k.m, key)
	}
}

// lock locks key, waiting until ctx ends, and returns the unlock function.
func (k *keyLocks) lock(ctx context.Context, key string) (func(), error) {
	l := k.ref(key)
	select {
	case l.ch <- struct{}{}:
	case <-ctx.Done():
		k.unref(key, l)
		return nil, fmt.Errorf("volume %s: %w (%v)", key, ErrBusy, ctx.Err())
	}
	return func() {
		<-l.ch
		k.unref(key, l)
	}, nil
}

// tryLock locks key if nobody holds it.
func (k *keyLocks) tryLock(key string) (func(), bool) {
	l := k.ref(key)
	select {
	case l.ch <- struct{}{}:
	default:
		k.unref(key, l)
		return nil, false
	}
	return func() {
		<-l.ch
		k.unref(key, l)
	}, true
}
