package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"sync/atomic"
	"testing"
)

// splicingBackend is a fileBackend that offers FileReader, with a virtual
// size past the end of its file (that tail reads as zeros), and counts
// which read path the server took.
type splicingBackend struct {
	*fileBackend
	size               int64
	readFiles, readAts atomic.Int64
}

func (b *splicingBackend) Size() int64 { return b.size }

func (b *splicingBackend) ReadAt(p []byte, off int64) (int, error) {
	b.readAts.Add(1)
	n, err := b.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

func (b *splicingBackend) Extent(off, length int64) (int64, bool, error) {
	fsize := b.fileBackend.Size()
	if off >= fsize {
		return length, false, nil
	}
	return b.fileBackend.Extent(off, min(length, fsize-off))
}

// ReadFile reports holes in the file as zero pieces.
func (b *splicingBackend) ReadFile(off, length int64, piece func(*os.File, int64, int64) error) error {
	b.readFiles.Add(1)
	for length > 0 {
		n, alloc, err := b.Extent(off, length)
		if err != nil {
			return err
		}
		f := b.f
		if !alloc {
			f = nil
		}
		if err := piece(f, off, n); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// socketClient is newRawClient over a unix socketpair, which the server
// can splice into.
func socketClient(t *testing.T, exports ...Export) *rawClient {
	t.Helper()
	srv, err := NewServer(exports...)
	if err != nil {
		t.Fatal(err)
	}
	a, b := socketpair(t)
	return startRawClient(t, srv, a, b)
}

// readReply reads the reply to a READ of length bytes at off, simple or
// structured, and returns the data and the number of hole chunks.
func (rc *rawClient) readReply(structured bool, handle, off uint64, length uint32) (data []byte, holes int) {
	rc.t.Helper()
	if !structured {
		if h, e := rc.simpleReply(); h != handle || e != 0 {
			rc.t.Fatalf("reply: handle %d error %d", h, e)
		}
		data = make([]byte, length)
		rc.read(data)
		return data, 0
	}
	data = make([]byte, length)
	for {
		var h [20]byte
		rc.read(h[:])
		if binary.BigEndian.Uint32(h[:]) != structuredMagc || binary.BigEndian.Uint64(h[8:]) != handle {
			rc.t.Fatalf("bad chunk header % x", h)
		}
		flags, typ := binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:])
		p := make([]byte, binary.BigEndian.Uint32(h[16:]))
		rc.read(p)
		switch typ {
		case replyTypeData:
			at := binary.BigEndian.Uint64(p) - off
			copy(data[at:], p[8:])
		case replyTypeHole:
			holes++ // data is already zero there
		default:
			rc.t.Fatalf("chunk type %d: % x", typ, p)
		}
		if flags&replyFlagDone != 0 {
			return data, holes
		}
	}
}

func TestSplicedReads(t *testing.T) {
	const fileSize, size = 1 << 20, 1<<20 + 200<<10
	fb, _ := newFileBackend(t, fileSize)
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, fileSize)
	for i := range data {
		data[i] = byte(rng.Uint32() | 1) // no zero bytes: holes must show
	}
	if _, err := fb.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	// Holes at [64K, 128K) and [512K, 576K).
	for _, h := range []int64{64 << 10, 512 << 10} {
		if err := fb.Discard(h, 64<<10); err != nil {
			t.Fatal(err)
		}
	}
	b := &splicingBackend{fileBackend: fb, size: size}
	want := func(off, n int64) []byte {
		w := make([]byte, n)
		if _, err := b.ReadAt(w, off); err != nil {
			t.Fatal(err)
		}
		return w
	}
	for _, tc := range []struct {
		name          string
		socket        bool
		structured    bool
		off, n        int64
		spliced       bool
		wantHoleChunk bool
	}{
		{"aligned 64K, simple", true, false, 0, 64 << 10, true, false},
		{"aligned 64K, structured", true, true, 128 << 10, 64 << 10, true, false},
		{"4K is copied", true, false, 0, 4096, false, false},
		{"unaligned across a hole, simple", true, false, 60000, 80000, true, false},
		{"unaligned across a hole, structured", true, true, 60000, 80000, true, true},
		{"past the end of the file, simple", true, false, fileSize - 5000, 100 << 10, true, false},
		{"past the end of the file, structured", true, true, fileSize - 5000, 100 << 10, true, true},
		{"256K, structured", true, true, 256 << 10, 256 << 10, true, false},
		{"larger than a pipe is copied", true, true, 0, 1 << 20, false, true},
		{"no socket descriptor is copied", false, false, 0, 64 << 10, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			exp := Export{Name: "e", Backend: b}
			var rc *rawClient
			if tc.socket {
				rc = socketClient(t, exp)
			} else {
				rc = newRawClient(t, exp)
			}
			if tc.structured {
				if types, _ := rc.option(optStructuredReply, nil); types[0] != repAck {
					t.Fatalf("OPT_STRUCTURED_REPLY: %v", types)
				}
			}
			rc.goExport("e")
			b.readFiles.Store(0)
			b.readAts.Store(0)
			rc.request(cmdRead, 0, 7, uint64(tc.off), uint32(tc.n), nil)
			got, holes := rc.readReply(tc.structured, 7, uint64(tc.off), uint32(tc.n))
			if w := want(tc.off, tc.n); !bytes.Equal(got, w) {
				i := 0
				for i < len(w) && got[i] == w[i] {
					i++
				}
				t.Fatalf("data differs at %d (offset %d)", i, tc.off+int64(i))
			}
			spliced := b.readFiles.Load() > 0 && b.readAts.Load() == 1 // 1: want() above
			if spliced != tc.spliced {
				t.Errorf("spliced = %v (ReadFile %d, ReadAt %d), want %v", spliced, b.readFiles.Load(), b.readAts.Load()-1, tc.spliced)
			}
			if (holes > 0) != tc.wantHoleChunk {
				t.Errorf("%d hole chunks, want some: %v", holes, tc.wantHoleChunk)
			}
		})
	}
}
