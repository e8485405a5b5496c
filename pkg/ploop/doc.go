// Package ploop reads and writes ploop images: the thin disk image format of
// OpenVZ/Virtuozzo ploop, which QEMU calls "parallels".
//
// An image (one delta) is a 64-byte header, a block allocation table (BAT)
// and data clusters. The virtual disk is cut into clusters (1 MiB by
// default); BAT entry i says where virtual cluster i lives in the file, or 0
// when it is not allocated and reads as zeros. New clusters are appended to
// the file. Crash consistency: a cluster's data is written before its BAT
// entry, every BAT change is written through to the file at once (so a
// killed process loses nothing it acknowledged) and becomes durable at
// Flush, a cluster that hides data below it has its data made durable
// before its entry is written, the header carries an in-use mark while the
// image is open for writing, and an image found with that mark set must be
// checked and repaired before it is written again. docs/design.md states
// these invariants and the crash model they give.
//
// A Stack (stack.go) is a directory in OpenVZ's layout: DiskDescriptor.xml
// (descriptor.go) lists a chain of deltas, the base possibly raw. Reads fall
// through the chain, writes go to the top delta with whole-cluster copy-up.
// Snapshots freeze the top in O(1); deleting a snapshot merges its delta
// into the one above; clones share a snapshot's deltas by hard link, the
// link count being the on-disk reference count (snapshot.go). Every
// descriptor change is atomic (tmp, fsync, rename, fsync dir) and ordered
// after the data it refers to, so RepairStack (stackcheck.go) returns an
// interrupted operation's stack to the state before or after it.
//
// Raw is a plain raw file with the same methods, so both can be served as a
// block device. All file I/O goes through the small storage layer in
// storage.go (pread/pwrite, fdatasync, hole punching, optional O_DIRECT).
package ploop

import "os"

// OpenOptions select how an image file is opened.
type OpenOptions struct {
	// ReadOnly refuses writes; the file is opened O_RDONLY and the
	// in-use mark is left alone.
	ReadOnly bool
	// Direct opens the file with O_DIRECT, bypassing the host page cache
	// (the guest filesystem has its own); the filesystem must support it.
	Direct bool
	// faults, set only by tests, fails chosen storage calls (faults.go).
	faults faultFunc
}

// Disk is what Image and Raw both offer: a virtual disk of Size bytes that
// knows which of its ranges are allocated. It is the shape a block-device
// server needs, and what a stack of deltas will use for its base.
type Disk interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every completed write durable.
	Flush() error
	// Discard deallocates what it can of the range; it reads back zeros.
	Discard(off, length int64) error
	// WriteZeroes makes the range read as zeros; noHole keeps it
	// allocated.
	WriteZeroes(off, length int64, noHole bool) error
	// Extent reports the run of equally allocated bytes at off: its
	// length n (0 < n <= length) and whether it is allocated.
	Extent(off, length int64) (n int64, allocated bool, err error)
	// ReadFile maps a range to the file pieces that hold it (see
	// fileread.go), for servers that splice instead of copying.
	ReadFile(off, length int64, piece func(f *os.File, fileOff, n int64) error) error
	ReadOnly() bool
	Close() error
}

var (
	_ Disk = (*Image)(nil)
	_ Disk = (*Raw)(nil)
)
