package ublk

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// RecoveryFeatures are what a server needs of the kernel to survive its
// own restart without an I/O error: the device waits for a successor
// (user recovery) and hands it the requests that were in flight
// (reissue).
const RecoveryFeatures = FlagUserRecovery | FlagUserRecoveryReissue

// SelfTestTag marks the self-test's device (the kernel keeps it with the
// device, as Options.Tag), so that a self-test whose process died mid-way
// leaves nothing the next one does not remove.
const SelfTestTag uint64 = 0x74732d706f6f6c70 // "ploop-st"

// sweepTimeout bounds the wait for one leftover's deletion, which the
// kernel holds back while anyone still has the device open.
const sweepTimeout = 5 * time.Second

// SelfTest proves that this kernel's ublk works for us before volumes
// depend on it: the driver has the recovery features, and a small device
// served from memory takes a direct write and reads it back through the
// block device. It leaves no device behind, and first removes what earlier
// self-tests that died left.
func SelfTest(ctrl *Control) error {
	feat, err := ctrl.Features()
	if err != nil {
		return fmt.Errorf("ublk self-test: %w", err)
	}
	if feat&RecoveryFeatures != RecoveryFeatures {
		return fmt.Errorf("ublk self-test: the kernel's ublk lacks user recovery with reissue (features %#x), so a restart of the server would fail I/O", feat)
	}
	sweepSelfTests(ctrl)
	mem := &memBackend{data: make([]byte, 1<<20)}
	d, err := Create(ctrl, mem, Options{Queues: 1, Depth: 4, BlockSize: 4096, Tag: SelfTestTag})
	if err != nil {
		return fmt.Errorf("ublk self-test: %w", err)
	}
	err = checkDirectIO(d.Path())
	return errors.Join(err, d.Close())
}

// sweepSelfTests deletes the devices of earlier self-tests that are no
// longer served: a live one may be another process's self-test under way.
// What it cannot delete now (someone holds it) stays for the next sweep;
// the self-test goes on regardless, since a leftover says nothing about
// whether ublk works.
func sweepSelfTests(ctrl *Control) {
	found, err := ctrl.Find(SelfTestTag)
	if err != nil {
		return
	}
	for _, info := range found {
		if info.State == StateLive {
			continue
		}
		// A server that died leaves its device quiesced or dead; stop
		// fails on one already stopped, which is what delete wants.
		ctrl.Stop(info.ID)
		done := make(chan error, 1)
		go func() { done <- ctrl.Delete(info.ID) }()
		select {
		case <-done:
		case <-time.After(sweepTimeout):
		}
	}
}

// checkDirectIO writes a block to dev with O_DIRECT and reads it back.
func checkDirectIO(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("ublk self-test: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeDevice == 0 {
		return fmt.Errorf("ublk self-test: %s is not a block device (%v)", dev, err)
	}
	// O_DIRECT wants aligned memory: an anonymous mapping is.
	buf, err := unix.Mmap(-1, 0, 8192, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("ublk self-test: %w", err)
	}
	defer unix.Munmap(buf)
	w, r := buf[:4096], buf[4096:]
	for i := range w {
		w[i] = byte(i*7 + 1)
	}
	if _, err := f.WriteAt(w, 8192); err != nil {
		return fmt.Errorf("ublk self-test: write %s: %w", dev, err)
	}
	if _, err := f.ReadAt(r, 8192); err != nil {
		return fmt.Errorf("ublk self-test: read %s: %w", dev, err)
	}
	if !bytes.Equal(w, r) {
		return fmt.Errorf("ublk self-test: %s read back other data than was written", dev)
	}
	return nil
}

// memBackend is a disk in memory, for the self-test.
type memBackend struct {
	mu   sync.Mutex
	data []byte
}

func (m *memBackend) Size() int64    { return int64(len(m.data)) }
func (m *memBackend) ReadOnly() bool { return false }
func (m *memBackend) Flush() error   { return nil }

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}

func (m *memBackend) Discard(off, length int64) error { return m.WriteZeroes(off, length, false) }

func (m *memBackend) WriteZeroes(off, length int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}
