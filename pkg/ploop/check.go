package ploop

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/flock"
)

// ProblemKind names one kind of inconsistency Check finds.
type ProblemKind string

// The kinds of problems Check reports. qemu-img check knows the in-use mark,
// entries outside the file and leaks; the others are ploop's own checks.
const (
	// ProblemInUse: the in-use mark is set (not closed cleanly).
	ProblemInUse ProblemKind = "in-use"
	// ProblemBadDataOff: data_off is 0, overlaps the BAT or is misaligned.
	ProblemBadDataOff ProblemKind = "bad-data-off"
	// ProblemTruncated: the file ends inside the BAT or inside a cluster.
	ProblemTruncated ProblemKind = "truncated"
	// ProblemOutsideFile: a BAT entry points at or past the end of file.
	ProblemOutsideFile ProblemKind = "outside-file"
	// ProblemOverlapsBAT: a BAT entry points into the header or BAT.
	ProblemOverlapsBAT ProblemKind = "overlaps-bat"
	// ProblemMisaligned: a version 1 entry is not cluster-aligned.
	ProblemMisaligned ProblemKind = "misaligned"
	// ProblemDuplicate: two entries share (part of) a host cluster.
	ProblemDuplicate ProblemKind = "duplicate"
	// ProblemLeak: the file extends past its last used cluster.
	ProblemLeak ProblemKind = "leak"
	// ProblemUnalignedSize: the file size is not a multiple of the cluster.
	ProblemUnalignedSize ProblemKind = "unaligned-size"
	// ProblemBadExtOff: the format-extension offset is outside the file or
	// misaligned.
	ProblemBadExtOff ProblemKind = "bad-ext-off"
)

// Problem is one inconsistency found by Check.
type Problem struct {
	Kind ProblemKind `json:"kind"`
	// Entry is the BAT index concerned, or -1.
	Entry  int64  `json:"entry"`
	Detail string `json:"detail"`
	// Fixed is set by Repair once the problem is gone.
	Fixed bool `json:"fixed"`
}

// Report is the result of Check or Repair.
type Report struct {
	Path              string    `json:"path"`
	Version           int       `json:"version"`
	VirtualSize       int64     `json:"virtual_size"`
	ClusterSize       int64     `json:"cluster_size"`
	FileSize          int64     `json:"file_size"`
	AllocatedClusters int64     `json:"allocated_clusters"`
	Problems          []Problem `json:"problems"`
	// Repaired says Repair wrote changes.
	Repaired bool `json:"repaired"`
}

// Clean reports whether no unfixed problem remains.
func (r *Report) Clean() bool {
	for _, p := range r.Problems {
		if !p.Fixed {
			return false
		}
	}
	return true
}

// JSON encodes the report.
func (r *Report) JSON() ([]byte, error) {
	if r.Problems == nil {
		c := *r
		c.Problems = []Problem{}
		r = &c
	}
	return json.MarshalIndent(r, "", "  ")
}

// String is the report for a person.
func (r *Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: ploop v%d, virtual size %d, cluster size %d, file size %d, %d clusters allocated\n",
		r.Path, r.Version, r.VirtualSize, r.ClusterSize, r.FileSize, r.AllocatedClusters)
	if len(r.Problems) == 0 {
		b.WriteString("No errors were found on the image.\n")
		return b.String()
	}
	for _, p := range r.Problems {
		state := "ERROR"
		if p.Fixed {
			state = "FIXED"
		}
		if p.Entry >= 0 {
			fmt.Fprintf(&b, "%s %s: BAT entry %d: %s\n", state, p.Kind, p.Entry, p.Detail)
		} else {
			fmt.Fprintf(&b, "%s %s: %s\n", state, p.Kind, p.Detail)
		}
	}
	if r.Clean() {
		b.WriteString("The image was repaired and is now clean.\n")
	} else {
		fixed := 0
		for _, p := range r.Problems {
			if p.Fixed {
				fixed++
			}
		}
		fmt.Fprintf(&b, "%d problems found, %d fixed. Run check --repair to fix them.\n", len(r.Problems), fixed)
	}
	return b.String()
}

// analysis is what a scan of the header and BAT against the file found,
// and what Repair must do about it.
type analysis struct {
	problems []Problem
	// dataOff is the data_off (sectors) the image should have.
	dataOff uint32
	// clear lists entries that must be dropped; relocate lists entries
	// whose data must be copied to a fresh cluster.
	clear, relocate []uint32
	clearExt        bool
	// dataEnd is where the used part of the file ends (before relocated
	// copies are appended).
	dataEnd   int64
	allocated int64
}

func (a *analysis) add(kind ProblemKind, entry int64, format string, args ...any) {
	a.problems = append(a.problems, Problem{Kind: kind, Entry: entry, Detail: fmt.Sprintf(format, args...)})
}

// fatal reports whether the image must not be opened even read-only: its
// BAT would point reads at the wrong bytes.
func (a *analysis) fatal() bool {
	for _, p := range a.problems {
		switch p.Kind {
		case ProblemInUse, ProblemLeak, ProblemUnalignedSize, ProblemMisaligned, ProblemDuplicate, ProblemBadExtOff:
		default:
			return true
		}
	}
	return false
}

// blocksWrite reports whether the image must be repaired before writing.
func (a *analysis) blocksWrite() bool {
	for _, p := range a.problems {
		if p.Kind != ProblemLeak && p.Kind != ProblemUnalignedSize {
			return true
		}
	}
	return false
}

func (a *analysis) summary() string {
	kinds := []string{}
	for _, p := range a.problems {
		if !slices.Contains(kinds, string(p.Kind)) {
			kinds = append(kinds, string(p.Kind))
		}
	}
	return strings.Join(kinds, ", ")
}

// analyze checks the header h and the BAT bytes in meta (the first
// h.batBytes() bytes of the file, zero-padded when the file is shorter)
// against a file of fileSize bytes. It allocates in proportion to the
// number of allocated entries only, and meta is bounded by the file size.
func analyze(h *Header, meta []byte, fileSize int64) *analysis {
	a := &analysis{dataOff: h.DataOff}
	cs := h.ClusterSize()
	if h.InUseMarked() {
		a.add(ProblemInUse, -1, "the image was not closed cleanly (in-use mark set)")
	}
	if p := h.dataOffProblem(); p != "" {
		a.add(ProblemBadDataOff, -1, "%s; should be %d", p, h.expectedDataOff())
		a.dataOff = h.expectedDataOff()
	}
	dataStart := int64(a.dataOff) * SectorSize
	if fileSize < dataStart {
		a.add(ProblemTruncated, -1, "file size %d ends before the data area at %d", fileSize, dataStart)
	}
	a.dataEnd = dataStart
	var extStart, extEnd int64
	if h.ExtOff != 0 {
		extStart = int64(min(h.ExtOff, uint64(1)<<50)) * SectorSize
		extEnd = extStart + cs
		bad := true
		switch {
		case extStart < dataStart:
			a.add(ProblemBadExtOff, -1, "format extension at sector %d overlaps the header or BAT", h.ExtOff)
		case h.Version == 2 && h.ExtOff%uint64(h.Tracks) != 0:
			a.add(ProblemBadExtOff, -1, "format extension at sector %d is not cluster-aligned", h.ExtOff)
		case extEnd > fileSize:
			a.add(ProblemBadExtOff, -1, "format extension at sector %d lies outside the file", h.ExtOff)
		default:
			bad = false
		}
		if bad {
			a.clearExt = true
			extStart, extEnd = 0, 0
		}
	}
	// used is a host cluster in use: by BAT entry i, or by the format
	// extension when i is -1.
	type used struct{ off, i int64 }
	var live []used
	if extEnd > 0 {
		live = append(live, used{extStart, -1})
	}
	relocating := map[int64]bool{}
	le := binary.LittleEndian
	for i := range int64(h.BATEntries) {
		e := le.Uint32(meta[HeaderSize+4*i:])
		if e == 0 {
			continue
		}
		off := h.entryToOffset(e)
		switch {
		case off < dataStart:
			a.add(ProblemOverlapsBAT, i, "points at offset %d, inside the header and BAT (data starts at %d)", off, dataStart)
			a.clear = append(a.clear, uint32(i))
			continue
		case off >= fileSize:
			a.add(ProblemOutsideFile, i, "points at offset %d, past the end of the file (%d)", off, fileSize)
			a.clear = append(a.clear, uint32(i))
			continue
		case off+cs > fileSize:
			a.add(ProblemTruncated, i, "cluster at offset %d ends past the end of the file (%d)", off, fileSize)
		}
		if off%cs != 0 {
			a.add(ProblemMisaligned, i, "points at offset %d, not a multiple of the cluster size %d", off, cs)
			relocating[i] = true
			a.relocate = append(a.relocate, uint32(i))
		}
		live = append(live, used{off, i})
		a.dataEnd = max(a.dataEnd, off+cs)
	}
	// Clusters that share host space: the first (the extension, then the
	// lowest entry) keeps it, the others get a copy of the shared data.
	slices.SortFunc(live, func(x, y used) int {
		if c := cmp.Compare(x.off, y.off); c != 0 {
			return c
		}
		return cmp.Compare(x.i, y.i)
	})
	ownerEnd, owner := int64(-1), int64(0)
	for _, u := range live {
		if u.off >= ownerEnd {
			ownerEnd, owner = u.off+cs, u.i
			continue
		}
		if u.i == -1 {
			// The extension starts inside a data cluster: drop it.
			a.add(ProblemBadExtOff, -1, "format extension at offset %d overlaps the cluster of entry %d", u.off, owner)
			a.clearExt = true
			extEnd = 0
			continue
		}
		what := fmt.Sprintf("entry %d", owner)
		if owner == -1 {
			what = "the format extension"
		}
		a.add(ProblemDuplicate, u.i, "shares host offset %d with %s", u.off, what)
		if !relocating[u.i] {
			relocating[u.i] = true
			a.relocate = append(a.relocate, uint32(u.i))
		}
	}
	if extEnd > 0 {
		a.dataEnd = max(a.dataEnd, extEnd)
	}
	for _, u := range live {
		if u.i >= 0 {
			a.allocated++
		}
	}
	if fileSize > a.dataEnd {
		a.add(ProblemLeak, -1, "%d bytes leaked at the end of the file (used part ends at %d, file size %d)", fileSize-a.dataEnd, a.dataEnd, fileSize)
	}
	if h.Version == 2 && fileSize%cs != 0 {
		a.add(ProblemUnalignedSize, -1, "file size %d is not a multiple of the cluster size %d", fileSize, cs)
	}
	return a
}

// maxMissingBAT is how much of a BAT may be missing from a truncated file
// for Check and Repair to still handle it.
const maxMissingBAT = 4 << 20

// readMeta reads the header and BAT of an image file. The BAT buffer is
// allocated only after the header is validated and its size is bounded by
// the file size; a file shorter than the BAT yields zero entries for the
// missing part.
func readMeta(s storage, path string) (*Header, []byte, int64, error) {
	fileSize, err := s.Size()
	if err != nil {
		return nil, nil, 0, fmt.Errorf("%s: %w", path, err)
	}
	hb := make([]byte, HeaderSize)
	if n, err := s.ReadAt(hb, 0); n < HeaderSize {
		if err == nil || errors.Is(err, io.EOF) {
			return nil, nil, 0, fmt.Errorf("%s: file is %d bytes, shorter than a header: %w", path, fileSize, ErrNotPloop)
		}
		return nil, nil, 0, fmt.Errorf("read header of %s: %w", path, err)
	}
	h, err := ParseHeader(hb)
	if err != nil {
		return nil, nil, 0, fmt.Errorf("%s: %w", path, err)
	}
	n := h.batBytes()
	// A file shorter than its BAT is read as far as it goes (the rest is
	// zeros) so that Check can report it, but the buffer stays bounded by
	// the file size: a tiny file claiming a huge BAT is refused.
	if n > fileSize+maxMissingBAT {
		return nil, nil, 0, fmt.Errorf("%s: BAT of %d entries (%d bytes) does not fit a file of %d bytes: %w", path, h.BATEntries, n, fileSize, unix.EINVAL)
	}
	meta := make([]byte, n)
	got, err := s.ReadAt(meta[:min(n, fileSize)], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, 0, fmt.Errorf("read BAT of %s: %w", path, err)
	}
	clear(meta[got:])
	copy(meta, hb)
	return &h, meta, fileSize, nil
}

// Check inspects the image at path without changing it.
func Check(path string) (*Report, error) {
	s, err := openStorage(path, true, false)
	if err != nil {
		return nil, fmt.Errorf("check: %w", err)
	}
	defer s.Close()
	h, meta, fileSize, err := readMeta(s, path)
	if err != nil {
		return nil, fmt.Errorf("check: %w", err)
	}
	a := analyze(h, meta, fileSize)
	if h.InUseMarked() && openForWriting(path) {
		for i := range a.problems {
			if a.problems[i].Kind == ProblemInUse {
				a.problems[i].Detail = "the image is open for writing by another process right now (in-use mark set); check it after that process closes it"
			}
		}
	}
	return newReport(path, h, fileSize, a), nil
}

// openForWriting reports whether another process holds the image open for
// writing (Open and Repair take an exclusive flock).
func openForWriting(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	// A shorter wait than flock.Wait: a report on an image in use should
	// not take seconds, and a fork's copy lasts milliseconds.
	return errors.Is(flock.Within(f, unix.LOCK_SH, flock.Wait/8, nil), unix.EWOULDBLOCK)
}

func newReport(path string, h *Header, fileSize int64, a *analysis) *Report {
	return &Report{
		Path: path, Version: h.Version, VirtualSize: h.Size(), ClusterSize: h.ClusterSize(),
		FileSize: fileSize, AllocatedClusters: a.allocated, Problems: a.problems,
	}
}

// Repair checks the image at path and fixes what it finds: dropped entries
// that point outside the file or into the BAT, copies for clusters that
// share host space, realigned version 1 clusters, a corrected data_off, a
// truncated leak, a file extended to whole clusters, and finally a cleared
// in-use mark. Data is made durable before the BAT that refers to it, and
// the BAT before the file is truncated, so a crash during Repair leaves an
// image that a second Repair fixes.
func Repair(path string) (*Report, error) {
	s, err := openStorage(path, false, false)
	if err != nil {
		return nil, fmt.Errorf("repair: %w", err)
	}
	defer s.Close()
	if err := s.LockExclusive(); err != nil {
		return nil, fmt.Errorf("repair %s: the image is open for writing elsewhere: %w", path, err)
	}
	h, meta, fileSize, err := readMeta(s, path)
	if err != nil {
		return nil, fmt.Errorf("repair: %w", err)
	}
	a := analyze(h, meta, fileSize)
	rep := newReport(path, h, fileSize, a)
	if len(a.problems) == 0 {
		return rep, nil
	}
	if err := repair(s, h, meta, fileSize, a); err != nil {
		return rep, fmt.Errorf("repair %s: %w", path, err)
	}
	for i := range rep.Problems {
		rep.Problems[i].Fixed = true
	}
	rep.Repaired = true
	if rep.FileSize, err = s.Size(); err != nil {
		return rep, fmt.Errorf("repair %s: %w", path, err)
	}
	return rep, nil
}

func repair(s storage, h *Header, meta []byte, fileSize int64, a *analysis) error {
	cs := h.ClusterSize()
	le := binary.LittleEndian
	dataStart := int64(a.dataOff) * SectorSize
	// The BAT area must exist before anything is written after it.
	if fileSize < dataStart {
		if err := s.Truncate(dataStart); err != nil {
			return err
		}
		fileSize = dataStart
	}
	for _, i := range a.clear {
		le.PutUint32(meta[HeaderSize+4*int64(i):], 0)
	}
	// Copies go after everything in use, cluster-aligned.
	next := a.dataEnd
	if len(a.relocate) > 0 {
		next = (next + cs - 1) / cs * cs
		buf := make([]byte, cs)
		for _, i := range a.relocate {
			src := h.entryToOffset(le.Uint32(meta[HeaderSize+4*int64(i):]))
			n, err := s.ReadAt(buf, src)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("copy cluster %d: %w", i, err)
			}
			clear(buf[n:])
			if _, err := s.WriteAt(buf, next); err != nil {
				return fmt.Errorf("copy cluster %d: %w", i, err)
			}
			e, ok := h.offsetToEntry(next)
			if !ok {
				return fmt.Errorf("copy cluster %d: offset %d does not fit a BAT entry: %w", i, next, unix.EFBIG)
			}
			le.PutUint32(meta[HeaderSize+4*int64(i):], e)
			next += cs
		}
		if err := s.Sync(); err != nil {
			return err
		}
	}
	end := max(next, dataStart)
	// Clusters that end past the end of file are completed with zeros
	// before the BAT is written, so the BAT never points outside.
	if fileSize < end {
		if err := s.Truncate(end); err != nil {
			return err
		}
	}
	h.DataOff = a.dataOff
	if a.clearExt {
		h.ExtOff = 0
	}
	h.put(meta[:HeaderSize])
	// Write the BAT with the in-use mark still as found; clear it last.
	if _, err := s.WriteAt(meta[HeaderSize:], HeaderSize); err != nil {
		return fmt.Errorf("write BAT: %w", err)
	}
	if _, err := s.WriteAt(meta[:HeaderSize], 0); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	if err := s.Sync(); err != nil {
		return err
	}
	if fileSize > end {
		if err := s.Truncate(end); err != nil {
			return err
		}
	}
	h.InUse = 0
	h.put(meta[:HeaderSize])
	if _, err := s.WriteAt(meta[:HeaderSize], 0); err != nil {
		return fmt.Errorf("clear in-use mark: %w", err)
	}
	return s.Sync()
}
