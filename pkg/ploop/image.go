package ploop

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// ErrInUse says an image was not closed cleanly and must be checked and
// repaired before it is opened for writing.
var ErrInUse = errors.New("image was not closed cleanly (in-use mark set): run `ploopctl check --repair` on it first")

// ErrCorrupt says Check found problems that make the image unsafe to open.
var ErrCorrupt = errors.New("image is inconsistent: run `ploopctl check --repair` on it first")

// metaBlock is the unit in which dirty parts of the header and BAT are
// written back (a page, also the O_DIRECT alignment).
const metaBlock = 4096

// clusterLockStripes is how many locks serialize allocation and discard
// of virtual clusters (cluster i uses lock i % clusterLockStripes).
const clusterLockStripes = 256

// Image is one open ploop image (a single delta).
//
// Reads and writes may come from many goroutines. Writes to allocated
// clusters and all reads take only a read lock on the BAT; allocating or
// discarding a cluster takes that cluster's stripe lock while the data is
// written, and the BAT write lock only to publish the new entry.
type Image struct {
	path     string
	s        storage
	readOnly bool
	hdr      Header
	cs       int64
	size     int64

	mu sync.RWMutex
	// meta is the header and BAT exactly as on disk (header with the
	// in-use mark while open for writing).
	meta []byte
	// dirty marks metaBlocks changed since the last Flush.
	dirty map[int64]struct{}

	allocMu sync.Mutex
	// next is the file offset of the next cluster to allocate; the file
	// is always at least this long.
	next int64

	clusterLocks [clusterLockStripes]sync.Mutex
	flushMu      sync.Mutex
	// writeThroughMu orders the write-through of BAT blocks (publish), so
	// the last copy written of a block is its newest state; writeThroughBuf
	// is the copy, reused under the lock.
	writeThroughMu  sync.Mutex
	writeThroughBuf []byte
	closed          bool
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
	img, err := Open(path, OpenOptions{Direct: opts.Direct})
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
		hdr: *h, cs: h.ClusterSize(), size: h.Size(),
		meta: meta, dirty: map[int64]struct{}{},
	}
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

func (img *Image) writeHeader() error {
	img.mu.Lock()
	img.hdr.put(img.meta[:HeaderSize])
	hb := append([]byte(nil), img.meta[:HeaderSize]...)
	img.mu.Unlock()
	if _, err := img.s.WriteAt(hb, 0); err != nil {
		return err
	}
	return img.s.Sync()
}

// Size is the virtual size in bytes.
func (img *Image) Size() int64 { return img.size }

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

// setEntry publishes host as the location of virtual cluster i (0 =
// unallocated) and marks the BAT block dirty. The caller holds mu.
func (img *Image) setEntry(i, host int64) {
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
	img.dirty[pos/metaBlock] = struct{}{}
}

// ReadAt reads len(p) bytes at off. Unallocated clusters read as zeros.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := checkRange("read", off, int64(len(p)), img.size); err != nil {
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
		host, n := img.run(pos, len(p)-done)
		var err error
		if host != 0 {
			_, err = img.s.WriteAt(p[done:done+n], host)
		} else {
			// One cluster at a time: each allocation is separate.
			n = int(min(int64(n), img.cs-pos%img.cs))
			err = img.allocate(pos, p[done:done+n])
		}
		if err != nil {
			return done, fmt.Errorf("write %s at %d: %w", img.path, pos, err)
		}
		done += n
	}
	return done, nil
}

// allocate writes p at virtual offset pos inside one cluster that was
// unallocated when looked up. data == nil allocates a zero cluster.
func (img *Image) allocate(pos int64, p []byte) error {
	i := pos / img.cs
	lk := &img.clusterLocks[i%clusterLockStripes]
	lk.Lock()
	defer lk.Unlock()
	if host := img.lookup(i); host != 0 {
		// Someone else allocated it meanwhile.
		_, err := img.s.WriteAt(p, host+pos%img.cs)
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
// cluster holds: an unflushed write lost, never another cluster's data.
func (img *Image) publish(i, host int64) error {
	img.mu.Lock()
	img.setEntry(i, host)
	img.mu.Unlock()
	b := (HeaderSize + 4*i) / metaBlock
	img.writeThroughMu.Lock()
	defer img.writeThroughMu.Unlock()
	img.mu.RLock()
	start := b * metaBlock
	end := min(start+metaBlock, int64(len(img.meta)))
	img.writeThroughBuf = append(img.writeThroughBuf[:0], img.meta[start:end]...)
	img.mu.RUnlock()
	// The block stays dirty: Flush writes it again after the data's fsync.
	if _, err := img.s.WriteAt(img.writeThroughBuf, start); err != nil {
		return fmt.Errorf("write BAT block %d of %s: %w", b, img.path, err)
	}
	return nil
}

// reserve takes the next cluster at the end of the file and extends the
// file over it. Extending here, under allocMu, keeps the file size growing
// monotonically ahead of every data write.
func (img *Image) reserve() (int64, error) {
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	host := img.next
	if _, ok := img.hdr.offsetToEntry(host); !ok {
		return 0, fmt.Errorf("file offset %d is past what the BAT can address: %w", host, unix.EFBIG)
	}
	if err := img.s.Truncate(host + img.cs); err != nil {
		return 0, err
	}
	img.next = host + img.cs
	return host, nil
}

// Flush makes every completed write durable: fsync the data, then write the
// BAT blocks that refer to it, then fsync again.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil
	}
	img.flushMu.Lock()
	defer img.flushMu.Unlock()
	// Snapshot the dirty BAT blocks first: every entry in them was set
	// after its data was written, so the fsync below covers that data.
	type block struct {
		idx  int64
		data []byte
	}
	img.mu.Lock()
	blocks := make([]block, 0, len(img.dirty))
	for b := range img.dirty {
		start := b * metaBlock
		end := min(start+metaBlock, int64(len(img.meta)))
		blocks = append(blocks, block{b, append([]byte(nil), img.meta[start:end]...)})
	}
	clear(img.dirty)
	img.mu.Unlock()
	redirty := func() {
		img.mu.Lock()
		for _, b := range blocks {
			img.dirty[b.idx] = struct{}{}
		}
		img.mu.Unlock()
	}
	if err := img.s.Sync(); err != nil {
		redirty()
		return fmt.Errorf("flush %s: %w", img.path, err)
	}
	if len(blocks) == 0 {
		return nil
	}
	for _, b := range blocks {
		if _, err := img.s.WriteAt(b.data, b.idx*metaBlock); err != nil {
			redirty()
			return fmt.Errorf("flush %s: write BAT: %w", img.path, err)
		}
	}
	if err := img.s.Sync(); err != nil {
		redirty()
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
	switch {
	case host == 0 && !noHole:
		return nil
	case host == 0:
		host, err := img.reserve()
		if err != nil {
			return err
		}
		if err := img.s.ZeroRange(host, img.cs); err != nil {
			return err
		}
		return img.publish(i, host)
	case noHole:
		return img.s.ZeroRange(host+within, n)
	case within == 0 && (n == img.cs || i*img.cs+n == img.size):
		// The whole cluster (the last one may be partly past the end of
		// the disk). Unpublish first so that no new reader is sent to the hole.
		if err := img.publish(i, 0); err != nil {
			return err
		}
		return img.s.PunchHole(host, img.cs)
	default:
		return img.s.PunchHole(host+within, n)
	}
}

// Extent reports the run of equally allocated bytes starting at off, at most
// length bytes long.
func (img *Image) Extent(off, length int64) (int64, bool, error) {
	if err := checkRange("extent", off, length, img.size); err != nil {
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
	clusters := (img.size + img.cs - 1) / img.cs
	for i := range clusters {
		host := img.entry(i)
		if host == 0 {
			continue
		}
		length := min(img.cs, img.size-i*img.cs)
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
// stays set and the image needs a check before it is written again.
func (img *Image) Close() error {
	if img.closed {
		return fmt.Errorf("close %s: %w", img.path, os.ErrClosed)
	}
	img.closed = true
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
	if err := img.Flush(); err != nil {
		return err
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
	img.hdr.InUse = 0
	if err := img.writeHeader(); err != nil {
		return fmt.Errorf("close %s: clear in-use mark: %w", img.path, err)
	}
	return nil
}

func (img *Image) checkWrite(op string, off, length int64) error {
	if img.readOnly {
		return fmt.Errorf("%s %s: image is read-only: %w", op, img.path, unix.EPERM)
	}
	return checkRange(op, off, length, img.size)
}
