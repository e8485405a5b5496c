package drivere2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// recordWriter appends numbered records to one file, each followed by
// fdatasync, until stopped. Record i's bytes depend on i alone, so a file
// can be checked record by record. started counts the records whose write
// began, acked those whose fdatasync returned: a consistent image of the
// file taken at some instant holds records 0..k-1 exactly, for some k
// between acked and started at that instant.
type recordWriter struct {
	path    string
	size    int
	started atomic.Int64
	acked   atomic.Int64
	slowest atomic.Int64 // nanoseconds of the slowest record
	lastAck atomic.Int64 // unix nanoseconds of the last acknowledgement

	mu   sync.Mutex
	errs []error

	stop     chan struct{}
	done     chan struct{}
	progress chan struct{} // signalled after each acknowledgement
}

// record is record i of a log of size-byte records: its number, its
// complement, then a xorshift stream seeded by the number.
func record(i int64, size int) []byte {
	b := make([]byte, size)
	binary.LittleEndian.PutUint64(b, uint64(i))
	binary.LittleEndian.PutUint64(b[8:], ^uint64(i))
	x := uint64(i)*0x9e3779b97f4a7c15 + 1
	for o := 16; o+8 <= size; o += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[o:], x)
	}
	return b
}

// startWriter opens path (which must not exist) and starts appending.
func startWriter(t *testing.T, path string, size int) *recordWriter {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	w := &recordWriter{path: path, size: size, stop: make(chan struct{}), done: make(chan struct{}), progress: make(chan struct{}, 1)}
	go w.run(f)
	t.Cleanup(func() { w.finish() })
	return w
}

func (w *recordWriter) run(f *os.File) {
	defer close(w.done)
	defer f.Close()
	for i := int64(0); ; i++ {
		select {
		case <-w.stop:
			return
		default:
		}
		rec := record(i, w.size)
		start := time.Now()
		w.started.Store(i + 1)
		_, err := f.Write(rec)
		if err == nil {
			err = f.Sync()
		}
		if err != nil {
			// A failed append may leave part of the record: the log is
			// over, and the check of the errors tells.
			w.mu.Lock()
			w.errs = append(w.errs, fmt.Errorf("record %d: %w", i, err))
			w.mu.Unlock()
			return
		}
		if d := int64(time.Since(start)); d > w.slowest.Load() {
			w.slowest.Store(d)
		}
		w.lastAck.Store(time.Now().UnixNano())
		w.acked.Store(i + 1)
		select {
		case w.progress <- struct{}{}:
		default:
		}
	}
}

// waitAcked waits until at least n records are acknowledged.
func (w *recordWriter) waitAcked(t *testing.T, ctx context.Context, n int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for w.acked.Load() < n {
		select {
		case <-w.progress:
		case <-w.done:
			if w.acked.Load() < n {
				t.Fatalf("the writer stopped at %d records, before %d: %v", w.acked.Load(), n, w.errors())
			}
		case <-ctx.Done():
			t.Fatalf("the writer did not reach %d records (at %d): %v", n, w.acked.Load(), w.errors())
		}
	}
}

func (w *recordWriter) errors() []error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]error(nil), w.errs...)
}

// finish stops the writer and returns the records it acknowledged.
func (w *recordWriter) finish() int64 {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
	return w.acked.Load()
}

// verifyLog checks that the file at path is records 0..k-1 of size bytes
// exactly, with min <= k <= max, and returns k.
func verifyLog(t *testing.T, path string, size int, min, max int64) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b)%size != 0 {
		t.Fatalf("%s: %d bytes, not a whole number of %d-byte records", path, len(b), size)
	}
	k := int64(len(b) / size)
	for i := int64(0); i < k; i++ {
		if got := b[i*int64(size) : (i+1)*int64(size)]; !bytes.Equal(got, record(i, size)) {
			t.Fatalf("%s: record %d of %d is wrong (it starts %x)", path, i, k, got[:16])
		}
	}
	if k < min || k > max {
		t.Fatalf("%s holds records 0..%d, want between %d and %d records", path, k-1, min, max)
	}
	return k
}
