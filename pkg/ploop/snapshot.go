package ploop

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// SnapshotInfo describes one delta of a stack for snapshot-list.
type SnapshotInfo struct {
	GUID       string `json:"guid"`
	ParentGUID string `json:"parent_guid"`
	File       string `json:"file"`
	Type       string `json:"type"`
	// Top is the writable delta (the current state, not a snapshot).
	Top bool `json:"top"`
	// Links is the file's hard-link count: how many stack directories
	// reference this delta.
	Links uint64 `json:"links"`
}

// ErrChainFull says a snapshot would exceed MaxChain deltas.
var ErrChainFull = fmt.Errorf("the stack already has %d deltas (the OpenVZ limit)", MaxChain)

// newDeltaFile picks a fresh file name for a delta.
func newDeltaFile(dir string) (string, error) {
	for range 8 {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", err
		}
		name := baseFile + "." + hex.EncodeToString(b[:])
		if _, err := os.Lstat(filepath.Join(dir, name)); errors.Is(err, os.ErrNotExist) {
			return name, nil
		}
	}
	return "", fmt.Errorf("no free delta file name in %s: %w", dir, os.ErrExist)
}

// ensureClean refuses a Compressed delta that was not closed cleanly.
func ensureClean(dir string, im DescriptorImg) error {
	if im.Type != TypeCompressed {
		return nil
	}
	info, err := Inspect(filepath.Join(dir, im.File))
	if err != nil {
		return err
	}
	if info.InUse {
		return fmt.Errorf("delta %s: %w", im.File, ErrInUse)
	}
	return nil
}

// Snapshot freezes the current top delta of the (not served) stack in dir
// under a new GUID and starts a new empty top. It costs O(1): one empty
// file and one descriptor switch. It returns the snapshot's GUID.
func Snapshot(dir string) (string, error) { return snapshot(dir, nil) }

func snapshot(dir string, h *hooks) (string, error) {
	unlock, err := lockDir(dir)
	if err != nil {
		return "", fmt.Errorf("snapshot %s: %w", dir, err)
	}
	defer unlock()
	d, err := ReadDescriptor(dir)
	if err != nil {
		return "", fmt.Errorf("snapshot: %w", err)
	}
	chain := d.Chain()
	if len(chain) >= MaxChain {
		return "", fmt.Errorf("snapshot %s: %w", dir, ErrChainFull)
	}
	if err := ensureClean(dir, chain[len(chain)-1]); err != nil {
		return "", fmt.Errorf("snapshot %s: %w", dir, err)
	}
	name, err := newDeltaFile(dir)
	if err != nil {
		return "", fmt.Errorf("snapshot %s: %w", dir, err)
	}
	img, err := Create(filepath.Join(dir, name), CreateOptions{Size: d.Size(), ClusterSize: d.ClusterSize()})
	if err != nil {
		return "", fmt.Errorf("snapshot %s: %w", dir, err)
	}
	if err := img.Close(); err != nil {
		return "", fmt.Errorf("snapshot %s: %w", dir, err)
	}
	h.at("snapshot-delta-created")
	guid := NewGUID()
	topGUID := chain[len(chain)-1].GUID
	chain[len(chain)-1].GUID = guid
	chain = append(chain, DescriptorImg{GUID: topGUID, Type: TypeCompressed, File: name})
	nd := d.clone()
	for i := range nd.Snapshots.Shots {
		if nd.Snapshots.Shots[i].GUID == topGUID {
			nd.Snapshots.Shots[i].GUID = guid
		}
	}
	nd.setChain(chain)
	if err := writeDescriptor(dir, nd, h); err != nil {
		return "", fmt.Errorf("snapshot %s: %w", dir, err)
	}
	return guid, nil
}

// ListSnapshots lists the deltas of the stack in dir, base first; the last
// one is the top.
func ListSnapshots(dir string) ([]SnapshotInfo, error) {
	d, err := ReadDescriptor(dir)
	if err != nil {
		return nil, err
	}
	chain := d.Chain()
	out := make([]SnapshotInfo, 0, len(chain))
	parent := NoParentGUID
	for i, im := range chain {
		si := SnapshotInfo{GUID: im.GUID, ParentGUID: parent, File: im.File, Type: im.Type, Top: i == len(chain)-1}
		if n, err := linkCount(filepath.Join(dir, im.File)); err == nil {
			si.Links = n
		}
		out = append(out, si)
		parent = im.GUID
	}
	return out, nil
}

// DeleteSnapshot removes snapshot guid from the (not served) stack in dir
// by merging its delta into the delta above it: every cluster the snapshot
// holds that the upper delta lacks is copied up, the upper delta is
// fsynced, and only then does the descriptor drop the snapshot. Until that
// switch every state reads the same (the copied clusters equal what the
// upper delta showed through from below), so a crash leaves either the
// old stack or the new one; RepairStack tidies up.
func DeleteSnapshot(dir, guid string) error { return deleteSnapshot(dir, guid, nil) }

func deleteSnapshot(dir, guid string, h *hooks) error {
	unlock, err := lockDir(dir)
	if err != nil {
		return fmt.Errorf("delete snapshot %s: %w", dir, err)
	}
	defer unlock()
	d, err := ReadDescriptor(dir)
	if err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	chain := d.Chain()
	k := indexOf(chain, guid)
	switch {
	case k < 0:
		return fmt.Errorf("delete snapshot %s in %s: no such snapshot: %w", guid, dir, os.ErrNotExist)
	case k == len(chain)-1:
		return fmt.Errorf("delete snapshot %s in %s: it is the top delta, not a snapshot: %w", guid, dir, unix.EINVAL)
	}
	for _, im := range chain[k:] {
		if err := ensureClean(dir, im); err != nil {
			return fmt.Errorf("delete snapshot %s: %w", guid, err)
		}
	}
	lowerView := []DescriptorImg{chain[k]}
	if err := foldInto(dir, d, lowerView, chain[k+1], k == 0, h); err != nil {
		return fmt.Errorf("delete snapshot %s in %s: %w", guid, dir, err)
	}
	nd := d.clone()
	nd.setChain(append(append([]DescriptorImg(nil), chain[:k]...), chain[k+1:]...))
	if err := writeDescriptor(dir, nd, h); err != nil {
		return fmt.Errorf("delete snapshot %s: %w", guid, err)
	}
	if err := removeDeltas(dir, chain[k:k+1], h); err != nil {
		return fmt.Errorf("delete snapshot %s: %w", guid, err)
	}
	return nil
}

// Flatten makes the stack in dir independent of every other stack: the
// deltas shared with other directories (link count above 1), and any
// deltas below them, are folded into the delta just above the highest
// shared one, which becomes the base. Snapshots taken in this stack above
// the shared deltas are kept; those below go away with their deltas. A
// stack that shares nothing is left as it is. Crash safety is that of
// DeleteSnapshot.
func Flatten(dir string) error { return flatten(dir, nil) }

func flatten(dir string, h *hooks) error {
	unlock, err := lockDir(dir)
	if err != nil {
		return fmt.Errorf("flatten %s: %w", dir, err)
	}
	defer unlock()
	d, err := ReadDescriptor(dir)
	if err != nil {
		return fmt.Errorf("flatten: %w", err)
	}
	chain := d.Chain()
	shared := -1
	for i, im := range chain[:len(chain)-1] {
		links, err := linkCount(filepath.Join(dir, im.File))
		if err != nil {
			return fmt.Errorf("flatten %s: %w", dir, err)
		}
		if links > 1 {
			shared = i
		}
	}
	if shared < 0 {
		return nil
	}
	for _, im := range chain[shared+1:] {
		if err := ensureClean(dir, im); err != nil {
			return fmt.Errorf("flatten %s: %w", dir, err)
		}
	}
	if err := foldInto(dir, d, chain[:shared+1], chain[shared+1], true, h); err != nil {
		return fmt.Errorf("flatten %s: %w", dir, err)
	}
	nd := d.clone()
	nd.setChain(chain[shared+1:])
	if err := writeDescriptor(dir, nd, h); err != nil {
		return fmt.Errorf("flatten %s: %w", dir, err)
	}
	if err := removeDeltas(dir, chain[:shared+1], h); err != nil {
		return fmt.Errorf("flatten %s: %w", dir, err)
	}
	return nil
}

// deltaSize is the virtual size of one delta.
func deltaSize(dir string, im DescriptorImg) (int64, error) {
	path := filepath.Join(dir, im.File)
	if im.Type == TypePlain {
		st, err := os.Stat(path)
		if err != nil {
			return 0, err
		}
		return st.Size(), nil
	}
	info, err := Inspect(path)
	if err != nil {
		return 0, err
	}
	return info.VirtualSize, nil
}

func linkCount(path string) (uint64, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("stat %s: no link count", path)
	}
	return uint64(sys.Nlink), nil
}

// foldInto copies into the delta upper every cluster that upper lacks and
// the chain view (base first) has allocated, then flushes and closes upper
// cleanly. When becomesBase is set the result will have nothing below it,
// so all-zero clusters need not be copied.
func foldInto(dir string, d *Descriptor, view []DescriptorImg, upper DescriptorImg, becomesBase bool, h *hooks) error {
	dst, err := Open(filepath.Join(dir, upper.File), OpenOptions{})
	if err != nil {
		return err
	}
	// The view below upper is no larger than upper (grows change only the
	// top), so upper's size bounds the copy.
	size, cs := dst.Size(), d.ClusterSize()
	if size > d.Size() || dst.ClusterSize() != cs {
		dst.Close()
		return fmt.Errorf("delta %s does not match the descriptor: %w", upper.File, ErrCorrupt)
	}
	src := &Stack{dir: dir, readOnly: true, cs: cs, chain: view}
	src.size.Store(size)
	defer src.closeAll()
	for _, im := range view {
		l, err := openLayer(dir, im, OpenOptions{ReadOnly: true}, size, cs)
		if err != nil {
			dst.Close()
			return err
		}
		src.layers = append(src.layers, l)
	}
	// A few workers copy clusters in parallel so that reads of the source
	// and writes of the destination overlap (qemu-img convert does the
	// same with coroutines); Image allocates concurrently.
	var next atomic.Int64
	errs := make(chan error, foldWorkers)
	for range foldWorkers {
		go func() {
			buf := make([]byte, cs)
			for {
				start := next.Add(cs) - cs
				if start >= size {
					errs <- nil
					return
				}
				if err := foldCluster(src, dst, buf[:min(cs, size-start)], start, becomesBase); err != nil {
					errs <- err
					return
				}
				h.at("fold-cluster")
			}
		}()
	}
	var first error
	for range foldWorkers {
		if err := <-errs; err != nil && first == nil {
			first = err
			next.Store(size) // stop the other workers
		}
	}
	if first != nil {
		dst.Close()
		return first
	}
	if err := dst.Flush(); err != nil {
		dst.Close()
		return err
	}
	h.at("fold-flushed")
	return dst.Close()
}

// foldWorkers is how many clusters foldInto copies at once.
const foldWorkers = 4

// foldCluster copies the cluster at start from src to dst unless dst has
// it or src has nothing there. The copy hides what lies below dst, so its
// data is made durable before its BAT entry (see Image.allocate).
func foldCluster(src Disk, dst *Image, b []byte, start int64, becomesBase bool) error {
	clen := int64(len(b))
	if _, alloc, err := dst.Extent(start, clen); err != nil || alloc {
		return err
	}
	if alloc, err := anyExtent(src, start, clen); err != nil || !alloc {
		return err
	}
	if _, err := src.ReadAt(b, start); err != nil {
		return err
	}
	if becomesBase && allZero(b) {
		return nil
	}
	return dst.allocate(start, b, true)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// removeDeltas unlinks delta files no longer in the descriptor (other
// directories' hard links keep shared deltas alive).
func removeDeltas(dir string, ims []DescriptorImg, h *hooks) error {
	for _, im := range ims {
		if err := os.Remove(filepath.Join(dir, im.File)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		h.at("delta-removed")
	}
	return syncDir(dir)
}

// Clone makes dstDir a new stack whose lower deltas are those of snapshot
// guid of the stack in srcDir, shared by hard link (the link count is the
// reference count: deleting the source, the snapshot or another clone never
// frees them), with a new empty top. It costs O(chain length). The clone is
// built in a temporary directory next to dstDir and renamed into place, so
// a crash leaves either no dstDir or the complete clone.
//
// The source may be open and served meanwhile: Clone takes no lock on it
// and reads only its descriptor (replaced atomically) and the snapshot's
// deltas, which are frozen. The one change a frozen delta can see is a
// merge of the snapshot below it into it (DeleteSnapshot), which keeps
// what every chain through it reads; a delta the merge removes before it
// was linked makes Clone fail with os.ErrNotExist, and a retry reads the
// new descriptor.
func Clone(srcDir, guid, dstDir string) error { return cloneStack(srcDir, guid, dstDir, nil) }

func cloneStack(srcDir, guid, dstDir string, h *hooks) error {
	if _, err := os.Lstat(dstDir); err == nil {
		return fmt.Errorf("clone to %s: %w", dstDir, os.ErrExist)
	}
	d, err := ReadDescriptor(srcDir)
	if err != nil {
		return fmt.Errorf("clone: %w", err)
	}
	chain := d.Chain()
	k := indexOf(chain, guid)
	switch {
	case k < 0:
		return fmt.Errorf("clone %s: no snapshot %s: %w", srcDir, guid, os.ErrNotExist)
	case k == len(chain)-1:
		return fmt.Errorf("clone %s: %s is the top delta, take a snapshot first: %w", srcDir, guid, unix.EINVAL)
	}
	parent := filepath.Dir(filepath.Clean(dstDir))
	tmp := filepath.Join(parent, "."+filepath.Base(dstDir)+".clone-tmp")
	// A leftover of an interrupted clone to the same destination.
	if err := os.RemoveAll(tmp); err != nil {
		return fmt.Errorf("clone: %w", err)
	}
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fmt.Errorf("clone: %w", err)
	}
	fail := func(err error) error {
		os.RemoveAll(tmp)
		return fmt.Errorf("clone %s to %s: %w", srcDir, dstDir, err)
	}
	lower := append([]DescriptorImg(nil), chain[:k+1]...)
	for _, im := range lower {
		if err := os.Link(filepath.Join(srcDir, im.File), filepath.Join(tmp, im.File)); err != nil {
			return fail(err)
		}
		h.at("clone-linked")
	}
	name, err := newDeltaFile(tmp)
	if err != nil {
		return fail(err)
	}
	// The clone has the size the snapshot froze (the source may have
	// grown since).
	size, err := deltaSize(srcDir, chain[k])
	if err != nil {
		return fail(err)
	}
	img, err := Create(filepath.Join(tmp, name), CreateOptions{Size: size, ClusterSize: d.ClusterSize()})
	if err != nil {
		return fail(err)
	}
	if err := img.Close(); err != nil {
		return fail(err)
	}
	nd := d.clone()
	nd.setSize(uint64(size / SectorSize))
	nd.setChain(append(lower, DescriptorImg{GUID: TopGUID, Type: TypeCompressed, File: name}))
	if err := writeDescriptor(tmp, nd, h); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, dstDir); err != nil {
		return fail(err)
	}
	h.at("clone-renamed")
	if err := syncDir(parent); err != nil {
		return fmt.Errorf("clone to %s: sync %s: %w", dstDir, parent, err)
	}
	return nil
}
