package keylock

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func TestTryLockAndRelease(t *testing.T) {
	var k Locks
	unlock, ok := k.TryLock("a")
	if !ok {
		t.Fatal("TryLock of a free key failed")
	}
	if _, ok := k.TryLock("a"); ok {
		t.Fatal("TryLock of a held key succeeded")
	}
	other, ok := k.TryLock("b")
	if !ok {
		t.Fatal("TryLock of another key failed while a is held")
	}
	other()
	done := make(chan error)
	go func() {
		u, err := k.Lock(context.Background(), "a")
		if err == nil {
			u()
		}
		done <- err
	}()
	unlock()
	if err := <-done; err != nil {
		t.Fatalf("Lock after unlock: %v", err)
	}
	if n := k.held(); n != 0 {
		t.Fatalf("%d entries left after every lock was released", n)
	}
}

func TestLockGivesUpWithContext(t *testing.T) {
	var k Locks
	unlock, err := k.Lock(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := k.Lock(ctx, "a"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock of a held key = %v, want DeadlineExceeded", err)
	}
	if n := k.held(); n != 1 {
		t.Fatalf("%d entries with one holder and no waiter, want 1", n)
	}
}

// TestMutualExclusion counts holders of one key from many goroutines: never
// more than one at a time, and every increment survives.
func TestMutualExclusion(t *testing.T) {
	var k Locks
	var wg sync.WaitGroup
	var mu sync.Mutex // only to let the race detector see the counter
	holders, total := 0, 0
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				unlock, err := k.Lock(context.Background(), "k")
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				holders++
				if holders != 1 {
					t.Errorf("%d holders at once", holders)
				}
				total++
				holders--
				mu.Unlock()
				unlock()
			}
		}()
	}
	wg.Wait()
	if total != 16*200 || k.held() != 0 {
		t.Fatalf("total %d (want %d), %d entries left", total, 16*200, k.held())
	}
}
