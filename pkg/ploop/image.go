package ploop

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// ErrInUse says an image was not closed cleanly and must be checked and
// repaired before it is opened for writing.
var ErrInUse = errors.New("image was not closed cleanly (in-use mark set): run `ploopctl check --repair` on it first")

// ErrCorrupt says Check found problems that make the image unsafe to open.
var ErrCorrupt = errors.New("image is inconsistent: run `ploopctl check --repair` on it first")

// metaBlock is the unit in which the header and BAT are written (a page,
// also the O_DIRECT alignment).
const metaBlock = 4096

// clusterLockStripes is how many locks guard virtual clusters (cluster i
// uses lock i % clusterLockStripes).
const clusterLockStripes = 1024

// Image is one open ploop image (a single delta).
//
// Reads and writes may come from many goroutines. Reads take no cluster
// lock: they look up the BAT and read the file. A write to an allocated
// cluster holds that cluster's stripe lock shared from the lookup until its
// data is written; allocating, discarding and moving a cluster hold it
// exclusively. Moves (compaction, relocating grow) therefore never copy a
// cluster while a write to it is in flight, and the I/O of the rest of the
// disk goes on meanwhile. A file range given up by one cluster is only
// reused after the reads that may still be looking at it were waited out
// (see grace).
//
// Every BAT change is written to the file as it is made (publish), so the
// page cache always holds the current BAT and a killed process loses
// nothing it acknowledged; Flush is an fdatasync.
type Image struct {
	path     string
	s        storage
	readOnly bool
	cs       int64
	// size is the virtual size; atomic because Grow changes it while
	// requests check their ranges against it.
	size atomic.Int64

	mu sync.RWMutex
	// hdr is the header as on disk.
	hdr Header
	// meta is the header and BAT exactly as written to the file (header
	// with the in-use mark while open for writing).
	meta []byte

	allocMu sync.Mutex
	// next is the file offset of the next cluster to allocate; the file
	// is always at least this long.
	next int64
	// pending holds the host offsets reserved by allocations that have not
	// published them yet: compaction must neither fill nor cut them off.
	pending map[int64]struct{}
	// unpended is signalled when a pending offset is published or dropped.
	unpended *sync.Cond

	clusterLocks [clusterLockStripes]sync.RWMutex
	// moving tracks the clusters a move has copied but not yet switched.
	moving moveTracker
	// writeThroughMu orders the writes of BAT blocks, so that the last
	// copy written of a block is its newest state; writeThroughBuf is the
	// copy, reused under the lock.
	writeThroughMu  sync.Mutex
	writeThroughBuf []byte
	// syncs batches concurrent fdatasyncs (Flush, ordered allocations).
	syncs groupSync
	// maintMu serializes the operations that move clusters or change the
	// size (Grow, Compact) with each other.
	maintMu sync.Mutex
	closed  atomic.Bool
	// hooks lets crash tests stop Compact and a relocating Grow between
	// steps; nil in normal use.
	hooks *hooks
}

// CreateOptions describe a new image.
type CreateOptions struct {
	// Size is the virtual size in bytes, rounded up to whole sectors.
	Size int64
	// ClusterSize is a power of two from 32 KiB to 64 MiB; 0 means 1 MiB.
	ClusterSize int64
	// Direct opens the new image with O_DIRECT.
	Direct bool
	// faults, set only by tests, fails chosen storage calls (faults.go).
	faults faultFunc
}

// Create makes a new empty version 2 image at path (which must not exist)
// with the header qemu-img 7.2 writes, and opens it for writing. The file
// holds only the header and BAT and stays sparse.
func Create(path string, opts CreateOptions) (*Image, error) {
	h, err := newHeader(opts.Size, opts.ClusterSize)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w: %w", path, err, unix.EINVAL)
	}
	if path == "" {
		return nil, fmt.Errorf("create: empty path: %w", unix.EINVAL)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create: %w", err)
	}
	fail := func(err error) (*Image, error) {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	if _, err := f.WriteAt(h.Marshal(), 0); err != nil {
		return fail(err)
	}
	if err := f.Truncate(int64(h.DataOff) * SectorSize); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		return fail(err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	img, err := Open(path, OpenOptions{Direct: opts.Direct, faults: opts.faults})
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return img, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Open opens an existing image. Every header field and BAT entry is
// validated first. For writing, the image must be consistent and not carry
// the in-use mark (ErrInUse); Open then sets the mark and makes it durable.
// A read-only open accepts the in-use mark and other problems that cannot
// make reads return wrong bytes (leaks, duplicates).
func Open(path string, opts OpenOptions) (*Image, error) {
	if path == "" {
		return nil, fmt.Errorf("open: empty path: %w", unix.EINVAL)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("open %s: not a regular file: %w", path, unix.EINVAL)
	}
	s, err := openStorage(path, opts.ReadOnly, opts.Direct)
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	if s, err = opts.faults.wrap(s, path); err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	img, err := open(s, path, opts)
	if err != nil {
		s.Close()
		return nil, err
	}
	return img, nil
}

func open(s storage, path string, opts OpenOptions) (*Image, error) {
	if !opts.ReadOnly {
		if err := s.LockExclusive(); err != nil {
			return nil, fmt.Errorf("open %s: another process has it open for writing: %w", path, err)
		}
	}
	h, meta, fileSize, err := readMeta(s, path)
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	if h.batBytes() > fileSize {
		return nil, fmt.Errorf("open %s: file (%d bytes) ends inside the BAT: %w", path, fileSize, ErrCorrupt)
	}
	a := analyze(h, meta, fileSize)
	if !opts.ReadOnly && h.InUseMarked() {
		return nil, fmt.Errorf("open %s: %w", path, ErrInUse)
	}
	if a.fatal() || (!opts.ReadOnly && a.blocksWrite()) {
		return nil, fmt.Errorf("open %s: %s: %w", path, a.summary(), ErrCorrupt)
	}
	img := &Image{
		path: path, s: s, readOnly: opts.ReadOnly,
		hdr: *h, cs: h.ClusterSize(), meta: meta,
		pending: map[int64]struct{}{},
	}
	img.size.Store(h.Size())
	img.unpended = sync.NewCond(&img.allocMu)
	if opts.ReadOnly {
		return img, nil
	}
	// New clusters go after everything in the file, so they start out
	// reading zeros even where an earlier crash left data behind.
	img.next = (max(a.dataEnd, fileSize) + img.cs - 1) / img.cs * img.cs
	extOff := int64(img.hdr.ExtOff) * SectorSize
	if extOff != 0 {
		// Our writes would make the extension's dirty bitmaps stale, so
		// it is dropped before the first write rather than corrupted.
		klog.InfoS("dropping format extension: it is not maintained by writers", "image", path, "extOffSector", img.hdr.ExtOff)
		img.hdr.ExtOff = 0
	}
	img.hdr.InUse = inUseMagic
	if err := img.writeHeader(); err != nil {
		return nil, fmt.Errorf("open %s: set in-use mark: %w", path, err)
	}
	if extOff != 0 {
		// No longer referenced (the header is durable): free its space.
		if err := s.PunchHole(extOff, img.cs); err != nil {
			klog.InfoS("could not free the dropped format extension", "image", path, "err", err)
		}
	}
	return img, nil
}

// writeHeader writes img.hdr into the first metadata block and makes it
// durable.
func (img *Image) writeHeader() error {
	img.mu.Lock()
	img.hdr.put(img.meta[:HeaderSize])
	img.mu.Unlock()
	if err := img.writeBlocks([]int64{0}); err != nil {
		return err
	}
	return img.s.Sync()
}

// Size is the virtual size in bytes.
func (img *Image) Size() int64 { return img.size.Load() }

// ClusterSize is the cluster size in bytes.
func (img *Image) ClusterSize() int64 { return img.cs }

// ReadOnly reports whether writes are refused.
func (img *Image) ReadOnly() bool { return img.readOnly }

// Path is the file the image was opened from.
func (img *Image) Path() string { return img.path }

// Header returns a copy of the header as it is on disk now.
func (img *Image) Header() Header {
	img.mu.RLock()
	defer img.mu.RUnlock()
	return img.hdr
}

// entry returns the host offset of virtual cluster i, 0 when unallocated.
// The caller holds mu.
func (img *Image) entry(i int64) int64 {
	e := binary.LittleEndian.Uint32(img.meta[HeaderSize+4*i:])
	if e == 0 {
		return 0
	}
	return img.hdr.entryToOffset(e)
}

func (img *Image) lookup(i int64) int64 {
	img.mu.RLock()
	defer img.mu.RUnlock()
	return img.entry(i)
}

// setEntry sets the location of virtual cluster i (0 = unallocated) in
// memory and returns the metadata block to write. The caller holds mu.
func (img *Image) setEntry(i, host int64) int64 {
	var e uint32
	if host != 0 {
		var ok bool
		if e, ok = img.hdr.offsetToEntry(host); !ok {
			// next is kept cluster-aligned and bounded in reserve.
			panic(fmt.Sprintf("ploop: host offset %d is not representable", host))
		}
	}
	pos := HeaderSize + 4*i
	binary.LittleEndian.PutUint32(img.meta[pos:], e)
	return pos / metaBlock
}

// ReadAt reads len(p) bytes at off. Unallocated clusters read as zeros.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.checkRead("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		host, n := img.run(pos, len(p)-done)
		buf := p[done : done+n]
		if host == 0 {
			clear(buf)
		} else if err := img.readHost(buf, host); err != nil {
			return done, fmt.Errorf("read %s at %d: %w", img.path, pos, err)
		}
		done += n
	}
	return done, nil
}

// run maps the virtual range starting at pos (at most max bytes) to the
// longest run of clusters that are either all unallocated (host 0) or
// allocated contiguously in the file, and returns the host offset of pos
// and the run length.
func (img *Image) run(pos int64, maxLen int) (int64, int) {
	img.mu.RLock()
	defer img.mu.RUnlock()
	i := pos / img.cs
	within := pos % img.cs
	base := img.entry(i)
	n := min(int64(maxLen), img.cs-within)
	for n < int64(maxLen) {
		i++
		e := img.entry(i)
		if (base == 0) != (e == 0) || (base != 0 && e != base+(i-pos/img.cs)*img.cs) {
			break
		}
		n = min(int64(maxLen), n+img.cs)
	}
	if base == 0 {
		return 0, int(n)
	}
	return base + within, int(n)
}

// readHost reads file bytes; the tail of a freshly allocated cluster may
// lie past the end of file and reads as zeros.
func (img *Image) readHost(buf []byte, host int64) error {
	n, err := img.s.ReadAt(buf, host)
	if errors.Is(err, io.EOF) {
		clear(buf[n:])
		return nil
	}
	return err
}

// WriteAt writes len(p) bytes at off, allocating clusters as needed.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		n := int(min(int64(len(p)-done), img.cs-pos%img.cs))
		if err := img.writeCluster(p[done:done+n], pos); err != nil {
			return done, fmt.Errorf("write %s at %d: %w", img.path, pos, err)
		}
		done += n
	}
	return done, nil
}

// writeCluster writes p at pos, inside one cluster.
func (img *Image) writeCluster(p []byte, pos int64) error {
	i := pos / img.cs
	lk := &img.clusterLocks[i%clusterLockStripes]
	lk.RLock()
	if host := img.lookup(i); host != 0 {
		_, err := img.s.WriteAt(p, host+pos%img.cs)
		img.moving.changed(i)
		lk.RUnlock()
		return err
	}
	lk.RUnlock()
	return img.allocate(pos, p, false)
}

// allocate writes p at virtual offset pos inside one cluster that was
// unallocated when looked up. With ordered, the data is made durable before
// the BAT entry is written: a cluster that hides a lower delta (a copy-up)
// must never be found allocated without its data after a power loss, or
// its untouched part would read as zeros instead of the lower data.
func (img *Image) allocate(pos int64, p []byte, ordered bool) error {
	i := pos / img.cs
	lk := &img.clusterLocks[i%clusterLockStripes]
	lk.Lock()
	defer lk.Unlock()
	if host := img.lookup(i); host != 0 {
		// Someone else allocated it meanwhile.
		_, err := img.s.WriteAt(p, host+pos%img.cs)
		img.moving.changed(i)
		return err
	}
	host, err := img.reserve()
	if err != nil {
		return err
	}
	// The reserved cluster lies past all data and reads as zeros, so only
	// the written part needs writing: the cluster stays sparse.
	if len(p) > 0 {
		if _, err := img.s.WriteAt(p, host+pos%img.cs); err != nil {
			img.unpend(host)
			return err
		}
	}
	if ordered {
		if err := img.syncs.Sync(img.s.Sync); err != nil {
			img.unpend(host)
			return err
		}
	}
	return img.publish(i, host)
}

// publish sets the BAT entry of virtual cluster i (0 = unallocated) and
// writes its BAT block through to the file, without fsync. A client such as
// the kernel treats a completed write as done; if this process dies before
// the next Flush, the restarted server must still find the cluster, and the
// page cache outlives the process. A power loss before Flush may persist the
// entry before the data, which then reads as the zeros a freshly reserved
// cluster holds: an unflushed write lost, never another cluster's data
// (allocations that must not read as zeros are ordered, see allocate).
func (img *Image) publish(i, host int64) error {
	img.mu.Lock()
	b := img.setEntry(i, host)
	img.mu.Unlock()
	if host != 0 {
		img.unpend(host)
	}
	return img.writeBlocks([]int64{b})
}

// writeBlocks writes metadata blocks from their current state in memory.
// Every writer copies the block under writeThroughMu, so the copy written
// last is the newest: an older copy never lands over a newer one.
func (img *Image) writeBlocks(blocks []int64) error {
	img.writeThroughMu.Lock()
	defer img.writeThroughMu.Unlock()
	for _, b := range blocks {
		img.mu.RLock()
		start := b * metaBlock
		end := min(start+metaBlock, int64(len(img.meta)))
		img.writeThroughBuf = append(img.writeThroughBuf[:0], img.meta[start:end]...)
		img.mu.RUnlock()
		if _, err := img.s.WriteAt(img.writeThroughBuf, start); err != nil {
			return fmt.Errorf("write BAT block %d of %s: %w", b, img.path, err)
		}
	}
	return nil
}

// reserve takes the next cluster at the end of the file and extends the
// file over it. Extending here, under allocMu, keeps the file size growing
// monotonically ahead of every data write. The offset stays pending until
// publish or unpend.
func (img *Image) reserve() (int64, error) {
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	host := img.next
	img.mu.RLock()
	_, ok := img.hdr.offsetToEntry(host)
	img.mu.RUnlock()
	if !ok {
		return 0, fmt.Errorf("file offset %d is past what the BAT can address: %w", host, unix.EFBIG)
	}
	if err := img.s.Truncate(host + img.cs); err != nil {
		return 0, err
	}
	img.next = host + img.cs
	img.pending[host] = struct{}{}
	return host, nil
}

// unpend drops host from the pending reservations: it is published, or
// given up (a leak inside the file, harmless, trimmed or reused by
// compaction).
func (img *Image) unpend(host int64) {
	img.allocMu.Lock()
	delete(img.pending, host)
	img.allocMu.Unlock()
	img.unpended.Broadcast()
}

// Flush makes every completed write durable. The BAT blocks are in the
// file already (publish), so one fdatasync covers data and BAT alike.
func (img *Image) Flush() error {
	if img.closed.Load() {
		return fmt.Errorf("flush %s: %w", img.path, os.ErrClosed)
	}
	if img.readOnly {
		return nil
	}
	if err := img.syncs.Sync(img.s.Sync); err != nil {
		return fmt.Errorf("flush %s: %w", img.path, err)
	}
	return nil
}

// Discard deallocates whole clusters in the range (punching their holes in
// the file) and zeroes the partial clusters at its edges.
func (img *Image) Discard(off, length int64) error {
	if err := img.checkWrite("discard", off, length); err != nil {
		return err
	}
	return img.zero("discard", off, length, false)
}

// WriteZeroes makes the range read as zeros. Without noHole it behaves like
// Discard; with noHole every cluster in the range stays (or becomes)
// allocated.
func (img *Image) WriteZeroes(off, length int64, noHole bool) error {
	if err := img.checkWrite("write zeroes", off, length); err != nil {
		return err
	}
	return img.zero("write zeroes", off, length, noHole)
}

func (img *Image) zero(op string, off, length int64, noHole bool) error {
	end := off + length
	for pos := off; pos < end; {
		i := pos / img.cs
		within := pos % img.cs
		n := min(end-pos, img.cs-within)
		if err := img.zeroCluster(i, within, n, noHole); err != nil {
			return fmt.Errorf("%s %s at %d: %w", op, img.path, pos, err)
		}
		pos += n
	}
	return nil
}

func (img *Image) zeroCluster(i, within, n int64, noHole bool) error {
	lk := &img.clusterLocks[i%clusterLockStripes]
	lk.Lock()
	defer lk.Unlock()
	host := img.lookup(i)
	if host != 0 {
		defer img.moving.changed(i)
	}
	switch {
	case host == 0 && !noHole:
		return nil
	case host == 0:
		host, err := img.reserve()
		if err != nil {
			return err
		}
		if err := img.s.ZeroRange(host, img.cs); err != nil {
			img.unpend(host)
			return err
		}
		return img.publish(i, host)
	case noHole:
		return img.s.ZeroRange(host+within, n)
	case within == 0 && (n == img.cs || i*img.cs+n == img.Size()):
		// The whole cluster (the last one may be partly past the end of
		// the disk). The hole is punched while the entry still points at
		// it, so that the range is never free for compaction to fill
		// before the punch has happened; readers meanwhile see zeros.
		if err := img.s.PunchHole(host, img.cs); err != nil {
			return err
		}
		return img.publish(i, 0)
	default:
		return img.s.PunchHole(host+within, n)
	}
}

// Extent reports the run of equally allocated bytes starting at off, at most
// length bytes long.
func (img *Image) Extent(off, length int64) (int64, bool, error) {
	if err := img.checkRead("extent", off, length); err != nil {
		return 0, false, err
	}
	if length == 0 {
		return 0, false, fmt.Errorf("extent of %s at %d: zero length: %w", img.path, off, unix.EINVAL)
	}
	img.mu.RLock()
	defer img.mu.RUnlock()
	i := off / img.cs
	allocated := img.entry(i) != 0
	n := img.cs - off%img.cs
	for n < length && (img.entry(i+1) != 0) == allocated {
		i++
		n += img.cs
	}
	return min(n, length), allocated, nil
}

// Mapping is one run of allocated virtual clusters stored contiguously in
// the file.
type Mapping struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	// Host is the file offset of the run's first byte.
	Host int64 `json:"host"`
}

// Map lists the allocated ranges of the virtual disk in order.
func (img *Image) Map() []Mapping {
	img.mu.RLock()
	defer img.mu.RUnlock()
	var out []Mapping
	size := img.Size()
	clusters := (size + img.cs - 1) / img.cs
	for i := range clusters {
		host := img.entry(i)
		if host == 0 {
			continue
		}
		length := min(img.cs, size-i*img.cs)
		if k := len(out) - 1; k >= 0 && out[k].Offset+out[k].Length == i*img.cs && out[k].Host+out[k].Length == host {
			out[k].Length += length
			continue
		}
		out = append(out, Mapping{Offset: i * img.cs, Length: length, Host: host})
	}
	return out
}

// AllocatedClusters counts the allocated clusters.
func (img *Image) AllocatedClusters() int64 {
	img.mu.RLock()
	defer img.mu.RUnlock()
	var n int64
	for i := range int64(img.hdr.BATEntries) {
		if img.entry(i) != 0 {
			n++
		}
	}
	return n
}

// FileSize is the current size of the image file.
func (img *Image) FileSize() (int64, error) { return img.s.Size() }

// Close flushes, trims clusters freed at the end of the file, clears the
// in-use mark and closes the file. After a failed Close the in-use mark
// stays set and the image needs a check before it is written again. Every
// call after Close fails with an error wrapping os.ErrClosed; the caller
// must not close an image that has requests in flight.
func (img *Image) Close() error {
	if !img.closed.CompareAndSwap(false, true) {
		return fmt.Errorf("close %s: %w", img.path, os.ErrClosed)
	}
	if img.readOnly {
		return img.s.Close()
	}
	err := img.closeClean()
	if cerr := img.s.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", img.path, cerr)
	}
	return err
}

func (img *Image) closeClean() error {
	if err := img.syncs.Sync(img.s.Sync); err != nil {
		return fmt.Errorf("close %s: %w", img.path, err)
	}
	// Discarded or unused clusters at the end would count as a leak.
	img.mu.RLock()
	end := int64(img.hdr.DataOff) * SectorSize
	for i := range int64(img.hdr.BATEntries) {
		if h := img.entry(i); h != 0 {
			end = max(end, h+img.cs)
		}
	}
	img.mu.RUnlock()
	if size, err := img.s.Size(); err != nil {
		return fmt.Errorf("close %s: %w", img.path, err)
	} else if size > end {
		if err := img.s.Truncate(end); err != nil {
			return fmt.Errorf("close %s: trim: %w", img.path, err)
		}
	}
	img.mu.Lock()
	img.hdr.InUse = 0
	img.mu.Unlock()
	if err := img.writeHeader(); err != nil {
		return fmt.Errorf("close %s: clear in-use mark: %w", img.path, err)
	}
	return nil
}

// checkRead refuses calls on a closed image and ranges outside the disk.
func (img *Image) checkRead(op string, off, length int64) error {
	if img.closed.Load() {
		return fmt.Errorf("%s %s: %w", op, img.path, os.ErrClosed)
	}
	return checkRange(op, off, length, img.Size())
}

func (img *Image) checkWrite(op string, off, length int64) error {
	if img.readOnly {
		return fmt.Errorf("%s %s: image is read-only: %w", op, img.path, unix.EPERM)
	}
	return img.checkRead(op, off, length)
}
