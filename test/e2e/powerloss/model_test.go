package powerloss

import (
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// blockSize is the unit the workload writes and the model tracks.
const blockSize = 4096

// valueMagic starts every non-zero block the workload writes.
const valueMagic = 0x31304b4c42574c50 // "PLWBLK01"

// fillBlock writes into p (blockSize bytes) the value of write tag to
// block: a header naming both, then words that depend on tag, block and
// position, so that a torn, stale or misplaced block is recognised.
func fillBlock(p []byte, block int64, tag uint64) {
	le := binary.LittleEndian
	le.PutUint64(p[0:], valueMagic)
	le.PutUint64(p[8:], uint64(block))
	le.PutUint64(p[16:], tag)
	for i := 24; i < blockSize; i += 8 {
		le.PutUint64(p[i:], valueWord(block, tag, i))
	}
}

func valueWord(block int64, tag uint64, i int) uint64 {
	return tag*0x9e3779b97f4a7c15 ^ uint64(block)<<20 ^ uint64(i)*0xbf58476d1ce4e5b9
}

// blockContent says what a block read back holds: zeros, the value of
// write tag (tag > 0), or something else (garbage describes it).
type blockContent struct {
	zero    bool
	tag     uint64
	garbage string
}

func (c blockContent) String() string {
	switch {
	case c.zero:
		return "zeros"
	case c.garbage != "":
		return c.garbage
	default:
		return fmt.Sprintf("write #%d", c.tag)
	}
}

// decodeBlock says what block p holds. Beyond the header it compares one
// word per 512-byte sector: storage writes whole sectors, so a block torn
// between two writes, or holding another block's data, differs in one of
// them, and regenerating all 4 KiB of every block at every replay point
// is too slow under emulation.
func decodeBlock(p []byte, block int64) blockContent {
	if allZero(p) {
		return blockContent{zero: true}
	}
	le := binary.LittleEndian
	if le.Uint64(p[0:]) != valueMagic {
		return blockContent{garbage: fmt.Sprintf("foreign bytes (starting %x)", p[:16])}
	}
	b, tag := int64(le.Uint64(p[8:])), le.Uint64(p[16:])
	if b != block {
		return blockContent{garbage: fmt.Sprintf("block %d's write #%d (misplaced)", b, tag)}
	}
	for sector := 0; sector < blockSize; sector += 512 {
		first, last := sector+24, sector+504
		if le.Uint64(p[first:]) != valueWord(block, tag, first) || le.Uint64(p[last:]) != valueWord(block, tag, last) {
			return blockContent{garbage: fmt.Sprintf("write #%d torn or overwritten in the sector at byte %d", tag, sector)}
		}
	}
	return blockContent{tag: tag}
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// writeKind is what a write put into a block.
type writeKind uint8

const (
	kindData writeKind = iota
	kindZero
	kindDiscard
)

func (k writeKind) String() string {
	return [...]string{"data", "zeros", "discard"}[k]
}

// write is one write to one block as the model saw it.
type write struct {
	tag  uint64
	kind writeKind
	// marks is how many log marks had been inserted when the write was
	// issued: the write cannot be in the log before that many marks.
	marks int
}

func (w write) zero() bool { return w.kind != kindData }

func (w write) String() string {
	if w.kind == kindData {
		return fmt.Sprintf("#%d", w.tag)
	}
	return fmt.Sprintf("#%d(%s)", w.tag, w.kind)
}

// history is the writes to one block, in the order they were issued. A
// block has one writer at a time, so writes[:done] are the completed ones.
type history struct {
	writes []write
	done   int
}

// model records every write and flush of a workload, to decide what a
// block may hold at any point of the log.
type model struct {
	blocks []int64 // tracked block numbers (byte offset / blockSize), sorted
	index  map[int64]int

	// markMu orders marks: the log and marks hold them in the same order.
	markMu  sync.Mutex
	mu      sync.Mutex
	hist    []history
	nextTag uint64
	marks   []markRecord
	byName  map[string]int
}

// markRecord is a mark the workload inserted. durable is set for a flush
// mark: per tracked block, the index of its last write that had completed
// when the flush was issued (-1: none), all of which the flush made
// durable.
type markRecord struct {
	name    string
	durable []int32
}

func newModel(blocks []int64) *model {
	blocks = slices.Clone(blocks)
	slices.Sort(blocks)
	m := &model{blocks: blocks, index: map[int64]int{}, hist: make([]history, len(blocks)), byName: map[string]int{}}
	for i, b := range blocks {
		m.index[b] = i
	}
	return m
}

// begin records writes of kind to blocks that are about to be issued and
// returns their tags.
func (m *model) begin(blocks []int64, kind writeKind) []uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	tags := make([]uint64, len(blocks))
	for i, b := range blocks {
		m.nextTag++
		tags[i] = m.nextTag
		h := &m.hist[m.index[b]]
		h.writes = append(h.writes, write{tag: m.nextTag, kind: kind, marks: len(m.marks)})
	}
	return tags
}

// complete records that the last writes begun to blocks have completed.
func (m *model) complete(blocks []int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, b := range blocks {
		m.hist[m.index[b]].done++
	}
}

// completed returns, per tracked block, the index of its last completed
// write (-1: none): what a flush issued now must make durable.
func (m *model) completed() []int32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := make([]int32, len(m.hist))
	for i := range m.hist {
		d[i] = int32(m.hist[i].done - 1)
	}
	return d
}

// issued returns, per tracked block, how many writes have been issued.
func (m *model) issued() []int32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := make([]int32, len(m.hist))
	for i := range m.hist {
		d[i] = int32(len(m.hist[i].writes))
	}
	return d
}

// mark inserts a mark into the log with insert and records it once it is
// there; durable is what completed() said before the flush it stands for
// was issued (nil for marks that are not flushes).
func (m *model) mark(insert func(string) error, name string, durable []int32) error {
	m.markMu.Lock()
	defer m.markMu.Unlock()
	if err := insert(name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, dup := m.byName[name]; dup {
		return fmt.Errorf("mark %s inserted twice", name)
	}
	m.byName[name] = len(m.marks)
	m.marks = append(m.marks, markRecord{name: name, durable: durable})
	return nil
}

// pointState is what the model needs to know about a replay point: which
// of its marks are in the replayed prefix of the log.
type pointState struct {
	marks int // how many of the model's marks are in the prefix
	// flush is the last flush mark in the prefix, or nil.
	flush *markRecord
	// applied holds the names of the marks in the prefix.
	applied map[string]bool
}

// stateAt describes a point whose log prefix holds the marks named in
// applied (in log order).
func (m *model) stateAt(applied []string) (pointState, error) {
	ps := pointState{applied: map[string]bool{}}
	for _, name := range applied {
		i, ok := m.byName[name]
		if !ok {
			continue // the kernel's own marks
		}
		ps.applied[name] = true
		ps.marks++
		if m.marks[i].durable != nil {
			ps.flush = &m.marks[i]
		}
	}
	// Marks are inserted one at a time, so the prefix holds the first
	// ps.marks of them.
	for i := range ps.marks {
		if !ps.applied[m.marks[i].name] {
			return ps, fmt.Errorf("the log holds %d of the workload's marks but not %s, inserted before some of them", ps.marks, m.marks[i].name)
		}
	}
	return ps, nil
}

// legal returns what tracked block i may hold at a point: the write the
// last flush made durable (or the initial zeros when there was none), or
// any later write issued before the point's prefix ended.
func (m *model) legal(i int, ps pointState) (cands []write, initial bool) {
	h := &m.hist[i]
	d := -1
	if ps.flush != nil {
		d = int(ps.flush.durable[i])
	}
	if d < 0 {
		initial = true
	} else {
		cands = append(cands, h.writes[d])
	}
	for _, w := range h.writes[d+1:] {
		if w.marks <= ps.marks {
			cands = append(cands, w)
		}
	}
	return cands, initial
}

// check compares the content c of tracked block i with what the model
// allows; it returns "" when c is allowed, else why not.
func (m *model) check(i int, c blockContent, ps pointState) string {
	cands, initial := m.legal(i, ps)
	ok := false
	switch {
	case c.zero:
		ok = initial
		for _, w := range cands {
			ok = ok || w.zero()
		}
	case c.garbage == "":
		for _, w := range cands {
			ok = ok || (w.kind == kindData && w.tag == c.tag)
		}
	}
	if ok {
		return ""
	}
	b := m.blocks[i]
	var want strings.Builder
	flush := "no flush yet"
	if ps.flush != nil {
		flush = ps.flush.name
	}
	if initial {
		fmt.Fprintf(&want, "zeros (not written before %s)", flush)
	} else {
		fmt.Fprintf(&want, "%v (durable since %s)", cands[0], flush)
		cands = cands[1:]
	}
	if len(cands) > 0 {
		fmt.Fprintf(&want, " or a later write: %v", short(cands, 6))
	}
	what := c.String()
	if c.tag != 0 {
		what += m.describeTag(i, c.tag)
	}
	return fmt.Sprintf("block %d (byte %d): got %s, want %s", b, b*blockSize, what, want.String())
}

// describeTag places write tag in block i's history, for messages.
func (m *model) describeTag(i int, tag uint64) string {
	for k, w := range m.hist[i].writes {
		if w.tag == tag {
			issued := "before any mark"
			if w.marks > 0 {
				issued = "after mark " + m.marks[w.marks-1].name
			}
			return fmt.Sprintf(" (this block's write %d of %d, issued %s)", k+1, len(m.hist[i].writes), issued)
		}
	}
	return " (not a write to this block)"
}

func short(ws []write, n int) string {
	parts := make([]string, 0, n+1)
	for i, w := range ws {
		if i == n {
			parts = append(parts, fmt.Sprintf("… %d more", len(ws)-n))
			break
		}
		parts = append(parts, w.String())
	}
	return strings.Join(parts, ", ")
}

// readFunc reads from a view of the disk being checked.
type readFunc func(p []byte, off int64) (int, error)

// readTracked reads the tracked blocks below size in runs of consecutive
// blocks and calls visit for each with its content.
func (m *model) readTracked(read readFunc, size int64, visit func(i int, p []byte)) error {
	buf := make([]byte, 256*blockSize)
	for start := 0; start < len(m.blocks); {
		end := start + 1
		for end < len(m.blocks) && m.blocks[end] == m.blocks[end-1]+1 && end-start < 256 {
			end++
		}
		off := m.blocks[start] * blockSize
		n := min(int64(end-start)*blockSize, max(0, (size-off)/blockSize*blockSize))
		if n > 0 {
			p := buf[:n]
			if _, err := read(p, off); err != nil {
				return fmt.Errorf("read %d bytes at %d: %w", n, off, err)
			}
			for k := range int(n / blockSize) {
				visit(start+k, p[k*blockSize:(k+1)*blockSize])
			}
		}
		start = end
	}
	return nil
}

// verify reads every tracked block below size from read and checks it
// against the model at ps. It returns the problems (at most limit
// messages plus a count) and the number of blocks checked.
func (m *model) verify(read readFunc, size int64, ps pointState, limit int, where func(block int64) string) ([]string, int) {
	var probs []string
	bad, checked := 0, 0
	err := m.readTracked(read, size, func(i int, p []byte) {
		checked++
		msg := m.check(i, decodeBlock(p, m.blocks[i]), ps)
		if msg == "" {
			return
		}
		bad++
		if len(probs) < limit {
			if where != nil {
				msg += where(m.blocks[i])
			}
			probs = append(probs, msg)
		}
	})
	if err != nil {
		probs = append(probs, err.Error())
	}
	if bad > len(probs) {
		probs = append(probs, fmt.Sprintf("… %d of %d blocks wrong in all", bad, checked))
	}
	return probs, checked
}
