package uring

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"
)

// TestRawPushEnterReap drives a Raw as its owner would: entries pushed
// until the SQ is full, one Enter, every completion reaped with its user
// data, and Unpush taking back what the kernel never saw.
func TestRawPushEnterReap(t *testing.T) {
	for _, c := range []struct {
		name  string
		flags uint32
	}{{"64-byte entries", 0}, {"128-byte entries", SetupSQE128}} {
		t.Run(c.name, func(t *testing.T) {
			r, err := NewRaw(4, c.flags)
			skipIfRefused(t, err)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			f, err := os.Create(filepath.Join(t.TempDir(), "f"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteString("0123456789abcdef"); err != nil {
				t.Fatal(err)
			}
			bufs := make([][]byte, 4)
			for i := range bufs {
				bufs[i] = make([]byte, 4)
				if err := r.Push(func(sqe []byte) {
					PrepRW(sqe, opRead, int(f.Fd()), uint64(4*i), addrOf(bufs[i]), 4, uint64(100+i))
				}); err != nil {
					t.Fatal(err)
				}
			}
			if err := r.Push(func([]byte) {}); err == nil {
				t.Fatal("a fifth entry in a ring of four was accepted")
			}
			if err := r.Enter(4); err != nil {
				t.Fatal(err)
			}
			got := map[uint64]int32{}
			r.Reap(func(ud uint64, res int32) { got[ud] = res })
			runtime.KeepAlive(bufs)
			for i, b := range bufs {
				if got[uint64(100+i)] != 4 || string(b) != "0123456789abcdef"[4*i:4*i+4] {
					t.Errorf("read %d: result %d, %q", i, got[uint64(100+i)], b)
				}
			}

			if err := r.Push(func(sqe []byte) { PrepRW(sqe, opRead, int(f.Fd()), 0, addrOf(bufs[0]), 4, 7) }); err != nil {
				t.Fatal(err)
			}
			r.Unpush()
			if r.Pending() != 0 {
				t.Fatalf("pending %d after Unpush", r.Pending())
			}
			if err := r.Enter(0); err != nil {
				t.Fatal(err)
			}
			r.Reap(func(ud uint64, _ int32) { t.Errorf("completion %d of a taken-back entry", ud) })
		})
	}
	if _, err := NewRaw(3, 0); err == nil {
		t.Error("a ring of 3 entries was set up")
	}
}

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
