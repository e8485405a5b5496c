package ploop

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A Stack is a ploop disk made of a chain of deltas described by a
// directory's DiskDescriptor.xml (OpenVZ's layout). The base may be a raw
// ("Plain") file; every other delta is a ploop image. Only the top delta is
// written: a read falls through the chain to the highest delta that holds
// the cluster, and a write to a cluster held only by a lower delta first
// copies the whole cluster up, so that the lower deltas never change.
// Deltas below the top are shared, read-only, with snapshots and clones
// (see Snapshot, Clone); their files are hard links, so the file system's
// link count is the on-disk reference count and removing one directory never
// frees a delta another directory still uses.
//
// A directory opened for writing is locked (flock on the directory) so
// that offline operations (Snapshot, DeleteSnapshot, Flatten, RepairStack)
// cannot run while it is served.
type Stack struct {
	dir    string
	desc   *Descriptor
	chain  []DescriptorImg
	layers []Disk // base first; the last is the top
	// size is atomic because an online grow switches it while requests
	// check their ranges against it.
	size     atomic.Int64
	cs       int64
	readOnly bool
	direct   bool // deltas reopened by online operations keep O_DIRECT
	faults   faultFunc
	lock     *os.File

	// clusterLocks serialize the copy-up of a cluster with other writes
	// to that cluster that find it unallocated in the top.
	clusterLocks [clusterLockStripes]sync.Mutex
	closed       bool

	// inflight lets online operations wait out the requests that may
	// still use a mapping they changed (see grace).
	inflight grace
	// io is held shared by every I/O call and exclusively by the online
	// operations (stack_online.go) while they switch the chain: that
	// switch is the only time I/O pauses.
	io sync.RWMutex
	// online serializes the online operations with each other.
	online sync.Mutex
	// descSync is held by an online operation from its descriptor switch
	// until the switch is durable (a directory fsync done after I/O
	// resumed); Flush holds it shared, so a flush never reports done while
	// a power loss could still take away the chain that holds the data.
	descSync sync.RWMutex
}

var _ Disk = (*Stack)(nil)

// StackOptions select how OpenStack opens a directory.
type StackOptions struct {
	// ReadOnly refuses writes and takes no lock.
	ReadOnly bool
	// Direct opens the deltas with O_DIRECT.
	Direct bool
	// Snapshot, when set, opens the state the snapshot with this GUID
	// froze (read-only): the chain from the base up to that delta.
	Snapshot string
	// faults, set only by tests, fails chosen storage calls of every
	// delta the stack opens (faults.go).
	faults faultFunc
}

// InitOptions describe a new stack.
type InitOptions struct {
	Size        int64
	ClusterSize int64
	// RawBase makes the base a raw ("Plain") file instead of a ploop image.
	RawBase bool
}

// baseFile is the name ploop gives the base delta.
const baseFile = "root.hds"

// IsStackDir reports whether path is a directory with a descriptor.
func IsStackDir(path string) bool {
	st, err := os.Stat(filepath.Join(path, DescriptorName))
	return err == nil && st.Mode().IsRegular()
}

// InitStack creates dir (or uses it if it exists and is empty) with a
// one-delta stack: root.hds and DiskDescriptor.xml.
func InitStack(dir string, opts InitOptions) error {
	cs := opts.ClusterSize
	if cs == 0 {
		cs = DefaultClusterSize
	}
	h, err := newHeader(opts.Size, cs)
	if err != nil {
		return fmt.Errorf("init %s: %w: %w", dir, err, unix.EINVAL)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("init %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("init %s: %w", dir, err)
	}
	if len(ents) != 0 {
		return fmt.Errorf("init %s: directory is not empty: %w", dir, os.ErrExist)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return fmt.Errorf("init %s: %w", dir, err)
	}
	defer unlock()
	path := filepath.Join(dir, baseFile)
	typ := TypeCompressed
	if opts.RawBase {
		typ = TypePlain
		if err := createRaw(path, int64(h.Sectors)*SectorSize); err != nil {
			return fmt.Errorf("init %s: %w", dir, err)
		}
	} else {
		img, err := Create(path, CreateOptions{Size: opts.Size, ClusterSize: cs})
		if err != nil {
			return fmt.Errorf("init %s: %w", dir, err)
		}
		if err := img.Close(); err != nil {
			return fmt.Errorf("init %s: %w", dir, err)
		}
	}
	if err := WriteDescriptor(dir, newDescriptor(h.Sectors, cs, baseFile, typ)); err != nil {
		os.Remove(path)
		return fmt.Errorf("init %s: %w", dir, err)
	}
	return nil
}

func createRaw(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// lockDir takes the exclusive, non-blocking lock on a stack directory.
func lockDir(dir string) (func(), error) {
	f, err := openDirLocked(dir)
	if err != nil {
		return nil, err
	}
	return func() { f.Close() }, nil
}

func openDirLocked(dir string) (*os.File, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := lockExclusive(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("stack %s is in use by another process: %w", dir, err)
	}
	return f, nil
}

// OpenStack opens the stack in dir. For writing, the directory is locked
// and the top delta must have been closed cleanly (see RepairStack).
func OpenStack(dir string, opts StackOptions) (*Stack, error) {
	if opts.Snapshot != "" {
		opts.ReadOnly = true
	}
	s := &Stack{dir: dir, readOnly: opts.ReadOnly, direct: opts.Direct, faults: opts.faults}
	if !opts.ReadOnly {
		f, err := openDirLocked(dir)
		if err != nil {
			return nil, fmt.Errorf("open stack: %w", err)
		}
		s.lock = f
	}
	d, err := ReadDescriptor(dir)
	if err != nil {
		s.closeAll()
		return nil, fmt.Errorf("open stack %s: %w", dir, err)
	}
	s.desc = d
	s.chain = d.Chain()
	if opts.Snapshot != "" {
		k := indexOf(s.chain, opts.Snapshot)
		if k < 0 {
			s.closeAll()
			return nil, fmt.Errorf("open stack %s: no snapshot %s: %w", dir, opts.Snapshot, os.ErrNotExist)
		}
		s.chain = s.chain[:k+1]
	}
	s.size.Store(d.Size())
	s.cs = d.ClusterSize()
	for i, im := range s.chain {
		ro := opts.ReadOnly || i < len(s.chain)-1
		l, err := openLayer(dir, im, s.layerOptions(ro), s.Size(), s.cs)
		if err != nil {
			s.closeAll()
			return nil, fmt.Errorf("open stack %s: %w", dir, err)
		}
		s.layers = append(s.layers, l)
	}
	if err := s.checkSizes(opts.Snapshot == ""); err != nil {
		s.closeAll()
		return nil, fmt.Errorf("open stack %s: %w", dir, err)
	}
	return s, nil
}

// checkSizes makes the stack as large as its top delta and checks that
// no delta is larger than the one above it (a grow changes only the top).
// For the current state the top must match the descriptor.
func (s *Stack) checkSizes(current bool) error {
	top := s.top().Size()
	if current && top != s.Size() {
		return fmt.Errorf("the top delta is %d bytes, the descriptor says %d (an interrupted grow: run check --repair): %w", top, s.Size(), ErrCorrupt)
	}
	s.size.Store(top)
	for i := len(s.layers) - 1; i > 0; i-- {
		if s.layers[i-1].Size() > s.layers[i].Size() {
			return fmt.Errorf("delta %s is larger than the delta above it: %w", s.chain[i-1].File, ErrCorrupt)
		}
	}
	return nil
}

func indexOf(chain []DescriptorImg, guid string) int {
	for i, im := range chain {
		if im.GUID == guid {
			return i
		}
	}
	return -1
}

// openLayer opens one delta and checks that it matches the descriptor.
func openLayer(dir string, im DescriptorImg, opts OpenOptions, size, cs int64) (Disk, error) {
	path := filepath.Join(dir, im.File)
	if im.Type == TypePlain {
		r, err := OpenRawWith(path, opts)
		if err != nil {
			return nil, err
		}
		if r.Size() > size || r.Size() == 0 {
			r.Close()
			return nil, fmt.Errorf("raw base %s is %d bytes, the descriptor says %d: %w", path, r.Size(), size, ErrCorrupt)
		}
		return r, nil
	}
	img, err := Open(path, opts)
	if err != nil {
		return nil, err
	}
	if img.Size() > size || img.ClusterSize() != cs {
		img.Close()
		return nil, fmt.Errorf("delta %s has size %d and cluster %d, the descriptor says %d and %d: %w",
			path, img.Size(), img.ClusterSize(), size, cs, ErrCorrupt)
	}
	return img, nil
}

// layerOptions are the options for opening one of the stack's deltas.
func (s *Stack) layerOptions(readOnly bool) OpenOptions {
	return OpenOptions{ReadOnly: readOnly, Direct: s.direct, faults: s.faults}
}

func (s *Stack) closeAll() error {
	var first error
	for _, l := range s.layers {
		if err := l.Close(); err != nil && first == nil {
			first = err
		}
	}
	s.layers = nil
	if s.lock != nil {
		s.lock.Close()
		s.lock = nil
	}
	return first
}

// Dir is the stack directory.
func (s *Stack) Dir() string { return s.dir }

// begin registers an I/O call: it holds io shared (no chain switch runs
// meanwhile) and is counted in the current grace epoch.
func (s *Stack) begin() uint32 {
	s.io.RLock()
	return s.inflight.enter()
}

func (s *Stack) end(epoch uint32) {
	s.inflight.exit(epoch)
	s.io.RUnlock()
}

// Size is the virtual size in bytes.
func (s *Stack) Size() int64 { return s.size.Load() }

// ClusterSize is the cluster size in bytes.
func (s *Stack) ClusterSize() int64 { return s.cs }

// ReadOnly reports whether writes are refused.
func (s *Stack) ReadOnly() bool { return s.readOnly }

// Depth is the number of deltas in the open chain.
func (s *Stack) Depth() int {
	s.io.RLock()
	defer s.io.RUnlock()
	return len(s.layers)
}

func (s *Stack) top() Disk { return s.layers[len(s.layers)-1] }

// topImage is the top delta as an image; it is one whenever there are
// deltas below it (only a base may be raw).
func (s *Stack) topImage() *Image { return s.top().(*Image) }

// checkOpen refuses I/O on a closed stack: closed by Close, or by an
// online operation that could not leave it in a servable state. The
// caller holds io.
func (s *Stack) checkOpen(op string) error {
	if s.closed {
		return fmt.Errorf("%s %s: %w", op, s.dir, os.ErrClosed)
	}
	return nil
}

// readsNonZero returns a function reporting whether the deltas up to
// layer top read anything but zeros in virtual cluster i, or nil when
// there is nothing there (top < 0). The stack's size must not change while
// it is used.
func (s *Stack) readsNonZero(top int) func(i int64) (bool, error) {
	if top < 0 {
		return nil
	}
	buf := make([]byte, s.cs)
	return func(i int64) (bool, error) {
		off := i * s.cs
		n := min(s.cs, s.Size()-off)
		if n <= 0 {
			return false, nil
		}
		b := buf[:n]
		if err := s.readLayer(top, b, off); err != nil {
			return false, err
		}
		return !allZero(b), nil
	}
}

// ReadAt reads through the chain: each range comes from the highest delta
// that has it allocated.
func (s *Stack) ReadAt(p []byte, off int64) (int, error) {
	defer s.end(s.begin())
	if err := s.checkOpen("read"); err != nil {
		return 0, err
	}
	if err := checkRange("read", off, int64(len(p)), s.Size()); err != nil {
		return 0, err
	}
	if err := s.readLayer(len(s.layers)-1, p, off); err != nil {
		return 0, fmt.Errorf("read %s at %d: %w", s.dir, off, err)
	}
	return len(p), nil
}

func (s *Stack) readLayer(i int, p []byte, off int64) error {
	// Past a delta's size (it was frozen before a grow) there is no data
	// in it or below it.
	if end := s.layers[i].Size(); off+int64(len(p)) > end {
		if off >= end {
			clear(p)
			return nil
		}
		clear(p[end-off:])
		p = p[:end-off]
	}
	if i == 0 {
		_, err := s.layers[0].ReadAt(p, off)
		return err
	}
	l := s.layers[i]
	for done := int64(0); done < int64(len(p)); {
		pos := off + done
		n, alloc, err := l.Extent(pos, int64(len(p))-done)
		if err != nil {
			return err
		}
		buf := p[done : done+n]
		if alloc {
			_, err = l.ReadAt(buf, pos)
		} else {
			err = s.readLayer(i-1, buf, pos)
		}
		if err != nil {
			return err
		}
		done += n
	}
	return nil
}

// lowerAllocated reports whether any delta below the top has data in
// [off, off+length).
func (s *Stack) lowerAllocated(off, length int64) (bool, error) {
	for i := len(s.layers) - 2; i >= 0; i-- {
		length := min(length, s.layers[i].Size()-off)
		for done := int64(0); done < length; {
			n, alloc, err := s.layers[i].Extent(off+done, length-done)
			if err != nil {
				return false, err
			}
			if alloc {
				return true, nil
			}
			done += n
		}
	}
	return false, nil
}

// WriteAt writes to the top delta, copying clusters up from lower deltas
// where the write covers only part of them.
func (s *Stack) WriteAt(p []byte, off int64) (int, error) {
	defer s.end(s.begin())
	if err := s.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	top := s.top()
	for done := int64(0); done < int64(len(p)); {
		pos := off + done
		n, alloc, err := top.Extent(pos, int64(len(p))-done)
		if err != nil {
			return int(done), fmt.Errorf("write %s at %d: %w", s.dir, pos, err)
		}
		if alloc || len(s.layers) == 1 {
			// Allocated clusters never need a copy-up again.
			if _, err := top.WriteAt(p[done:done+n], pos); err != nil {
				return int(done), err
			}
			done += n
			continue
		}
		n = min(n, s.cs-pos%s.cs)
		if err := s.writeCluster(p[done:done+n], pos); err != nil {
			return int(done), fmt.Errorf("write %s at %d: %w", s.dir, pos, err)
		}
		done += n
	}
	return len(p), nil
}

// clusterSpan is the start and length of the cluster holding pos (the last
// cluster may end at the disk's end).
func (s *Stack) clusterSpan(pos int64) (int64, int64) {
	start := pos / s.cs * s.cs
	return start, min(s.cs, s.Size()-start)
}

// writeCluster writes p (inside one cluster) when the top did not have the
// cluster: a copy-up if a lower delta has data there.
func (s *Stack) writeCluster(p []byte, pos int64) error {
	start, clen := s.clusterSpan(pos)
	lk := &s.clusterLocks[(start/s.cs)%clusterLockStripes]
	lk.Lock()
	defer lk.Unlock()
	top := s.top()
	_, alloc, err := top.Extent(start, clen)
	if err != nil {
		return err
	}
	lower := false
	if !alloc {
		if lower, err = s.lowerAllocated(start, clen); err != nil {
			return err
		}
	}
	if !lower {
		_, err := top.WriteAt(p, pos)
		return err
	}
	// The new cluster hides lower data: whether the write covers it or
	// not, a power loss must find the lower data or the new data there,
	// never zeros (an ordered allocation).
	if int64(len(p)) == clen {
		return s.topImage().allocate(start, p, true)
	}
	buf := make([]byte, clen)
	if err := s.readLayer(len(s.layers)-2, buf, start); err != nil {
		return err
	}
	copy(buf[pos-start:], p)
	return s.topImage().allocate(start, buf, true)
}

// Flush makes the top delta durable (the others do not change).
func (s *Stack) Flush() error {
	// Before io, the order online operations take them in.
	s.descSync.RLock()
	defer s.descSync.RUnlock()
	s.io.RLock()
	defer s.io.RUnlock()
	if err := s.checkOpen("flush"); err != nil {
		return err
	}
	if s.readOnly {
		return nil
	}
	return s.top().Flush()
}

// Discard makes the range read as zeros and frees what it can. Where a
// lower delta has data the top keeps a zeroed cluster, so the lower data
// does not show through.
func (s *Stack) Discard(off, length int64) error {
	defer s.end(s.begin())
	if err := s.checkWrite("discard", off, length); err != nil {
		return err
	}
	return s.zero("discard", off, length, false)
}

// WriteZeroes makes the range read as zeros; noHole keeps it allocated.
func (s *Stack) WriteZeroes(off, length int64, noHole bool) error {
	defer s.end(s.begin())
	if err := s.checkWrite("write zeroes", off, length); err != nil {
		return err
	}
	return s.zero("write zeroes", off, length, noHole)
}

func (s *Stack) zero(op string, off, length int64, noHole bool) error {
	top := s.top()
	if len(s.layers) == 1 {
		if noHole || op == "write zeroes" {
			return top.WriteZeroes(off, length, noHole)
		}
		return top.Discard(off, length)
	}
	for end := off + length; off < end; {
		start, clen := s.clusterSpan(off)
		n := min(end-off, start+clen-off)
		if err := s.zeroCluster(off, n, start, clen, noHole); err != nil {
			return fmt.Errorf("%s %s at %d: %w", op, s.dir, off, err)
		}
		off += n
	}
	return nil
}

func (s *Stack) zeroCluster(pos, n, start, clen int64, noHole bool) error {
	lk := &s.clusterLocks[(start/s.cs)%clusterLockStripes]
	lk.Lock()
	defer lk.Unlock()
	top := s.top()
	lower, err := s.lowerAllocated(start, clen)
	if err != nil {
		return err
	}
	if !lower {
		return top.WriteZeroes(pos, n, noHole)
	}
	_, alloc, err := top.Extent(start, clen)
	if err != nil {
		return err
	}
	if alloc || n == clen {
		// Zeros that stay allocated in the top hide the lower data.
		return top.WriteZeroes(pos, n, true)
	}
	buf := make([]byte, clen)
	if err := s.readLayer(len(s.layers)-2, buf, start); err != nil {
		return err
	}
	clear(buf[pos-start : pos-start+n])
	return s.topImage().allocate(start, buf, true)
}

// Extent reports the run at off that is allocated in some delta, or in
// none.
func (s *Stack) Extent(off, length int64) (int64, bool, error) {
	defer s.end(s.begin())
	if err := s.checkOpen("extent"); err != nil {
		return 0, false, err
	}
	if err := checkRange("extent", off, length, s.Size()); err != nil {
		return 0, false, err
	}
	if length == 0 {
		return 0, false, fmt.Errorf("extent of %s at %d: zero length: %w", s.dir, off, unix.EINVAL)
	}
	for i := len(s.layers) - 1; i >= 0; i-- {
		avail := s.layers[i].Size() - off
		if avail <= 0 {
			break // nothing at or below this delta
		}
		q := min(length, avail)
		n, alloc, err := s.layers[i].Extent(off, q)
		if err != nil {
			return 0, false, err
		}
		if alloc {
			return n, true, nil
		}
		if n < q {
			length = n
		}
		// Otherwise the delta has nothing in the run: past its size
		// neither it nor the smaller deltas below it have data.
	}
	return length, false, nil
}

// Close flushes and closes every delta and releases the directory lock.
func (s *Stack) Close() error {
	s.online.Lock()
	defer s.online.Unlock()
	s.io.Lock()
	defer s.io.Unlock()
	if s.closed {
		return fmt.Errorf("close %s: %w", s.dir, os.ErrClosed)
	}
	s.closed = true
	return s.closeAll()
}

func (s *Stack) checkWrite(op string, off, length int64) error {
	if err := s.checkOpen(op); err != nil {
		return err
	}
	if s.readOnly {
		return fmt.Errorf("%s %s: stack is read-only: %w", op, s.dir, unix.EPERM)
	}
	return checkRange(op, off, length, s.Size())
}

// StackMapping is a run of the virtual disk that one delta provides.
type StackMapping struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	GUID   string `json:"guid"`
	File   string `json:"file"`
}

// Map lists, cluster by cluster, which delta provides the allocated parts
// of the virtual disk (the highest delta that has data there).
func (s *Stack) Map() ([]StackMapping, error) {
	s.io.RLock()
	defer s.io.RUnlock()
	if err := s.checkOpen("map"); err != nil {
		return nil, err
	}
	var out []StackMapping
	for start := int64(0); start < s.Size(); start += s.cs {
		clen := min(s.cs, s.Size()-start)
		for i := len(s.layers) - 1; i >= 0; i-- {
			if start >= s.layers[i].Size() {
				break
			}
			alloc, err := anyExtent(s.layers[i], start, min(clen, s.layers[i].Size()-start))
			if err != nil {
				return nil, fmt.Errorf("map %s: %w", s.dir, err)
			}
			if !alloc {
				continue
			}
			im := s.chain[i]
			if k := len(out) - 1; k >= 0 && out[k].GUID == im.GUID && out[k].Offset+out[k].Length == start {
				out[k].Length += clen
			} else {
				out = append(out, StackMapping{Offset: start, Length: clen, GUID: im.GUID, File: im.File})
			}
			break
		}
	}
	return out, nil
}

func anyExtent(d Disk, off, length int64) (bool, error) {
	for done := int64(0); done < length; {
		n, alloc, err := d.Extent(off+done, length-done)
		if err != nil || alloc {
			return alloc, err
		}
		done += n
	}
	return false, nil
}
