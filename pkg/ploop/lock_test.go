package ploop

import (
	"context"
	"os/exec"
	"sync"
	"testing"
)

// TestReopenWhileForking closes and reopens images for writing while
// other goroutines fork and exec without pause, as the node plugin does
// (mkfs, mount) while it switches deltas and repairs images.
func TestReopenWhileForking(t *testing.T) {
	img, path := mustCreate(t, 4<<20, 1<<20)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				exec.Command("/bin/true").Run()
			}
		}()
	}
	defer func() { cancel(); wg.Wait() }()
	for i := range 300 {
		im, err := Open(path, OpenOptions{})
		if err != nil {
			t.Fatalf("open #%d right after a close: %v", i, err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
