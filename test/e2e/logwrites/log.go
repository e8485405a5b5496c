// Package logwrites reads the log written by the kernel's dm-log-writes
// device-mapper target and replays it onto a copy of the logged device.
//
// dm-log-writes passes every I/O through to a data device and records each
// write, in the order it became durable, on a second (log) device: a write
// is appended when a FLUSH that covers it completes (or at once for FUA),
// the FLUSH itself follows the writes it covered, and userspace can insert
// named marks (Mark). Replaying the first n entries onto the data device's
// initial contents gives the device as a power loss at that moment could
// have left it, so a test can check every such state.
//
// The on-disk format (drivers/md/dm-log-writes.c, Documentation/admin-guide/
// device-mapper/log-writes.rst): all integers are little endian; the log's
// sector size is the logical block size of the data device. Sector 0 holds
// the super block (magic, version, entry count, sector size). The entries
// follow from sector 1, each a header sector (sector, sector count, flags,
// data length; a mark's name follows the header in the same sector) and,
// unless it is a discard, the written data (sector count sectors).
package logwrites

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
)

// Flags of a log entry.
type Flags uint64

// The flags dm-log-writes records (LOG_*_FLAG in the kernel).
const (
	FlagFlush    Flags = 1 << 0
	FlagFUA      Flags = 1 << 1
	FlagDiscard  Flags = 1 << 2
	FlagMark     Flags = 1 << 3
	FlagMetadata Flags = 1 << 4

	knownFlags = FlagFlush | FlagFUA | FlagDiscard | FlagMark | FlagMetadata
)

func (f Flags) String() string {
	var parts []string
	for _, n := range []struct {
		f    Flags
		name string
	}{{FlagFlush, "FLUSH"}, {FlagFUA, "FUA"}, {FlagDiscard, "DISCARD"}, {FlagMark, "MARK"}, {FlagMetadata, "METADATA"}} {
		if f&n.f != 0 {
			parts = append(parts, n.name)
		}
	}
	if rest := f &^ knownFlags; rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint64(rest)))
	}
	if len(parts) == 0 {
		return "WRITE"
	}
	return strings.Join(parts, "|")
}

const (
	// Magic and Version identify a log (WRITE_LOG_MAGIC, WRITE_LOG_VERSION).
	Magic   = 0x6a736677736872
	Version = 1

	superSize = 8 + 8 + 8 + 4
	entrySize = 8 + 8 + 8 + 8

	minSectorSize = 512
	// The kernel uses the data device's logical block size, at most a page
	// on the architectures we run; 64 KiB leaves room for large pages.
	maxSectorSize = 64 << 10
)

// ErrFormat is wrapped by every error about a malformed log.
var ErrFormat = errors.New("malformed dm-log-writes log")

// Entry is one logged write, flush, discard or mark.
type Entry struct {
	// Sector and Sectors locate the write on the data device, in units
	// of the log's SectorSize. A pure flush or a mark has Sectors 0.
	Sector, Sectors uint64
	Flags           Flags
	// Mark is the name of a mark entry.
	Mark string
	// dataOff is where the entry's data starts in the log.
	dataOff int64
}

// Offset and Length are the entry's byte range on the data device.
func (e Entry) Offset(sectorSize int64) int64 { return int64(e.Sector) * sectorSize }

// Length is the size in bytes of the write or discard.
func (e Entry) Length(sectorSize int64) int64 { return int64(e.Sectors) * sectorSize }

func (e Entry) String() string {
	if e.Flags&FlagMark != 0 {
		return fmt.Sprintf("%s %q", e.Flags, e.Mark)
	}
	return fmt.Sprintf("%s sector %d+%d", e.Flags, e.Sector, e.Sectors)
}

// Log is a parsed log. Entries are in log order; entry i is the (i+1)th
// thing made durable.
type Log struct {
	r          io.ReaderAt
	SectorSize int64
	Entries    []Entry
}

// Parse reads the super block and every entry header of the log in r (size
// bytes long, typically the log device or a file holding it). Everything is
// validated before it is used: an entry never reaches past the end of the
// log, and the work done is bounded by size.
func Parse(r io.ReaderAt, size int64) (*Log, error) {
	sb := make([]byte, superSize)
	if size < minSectorSize {
		return nil, fmt.Errorf("%w: %d bytes, shorter than a super block sector", ErrFormat, size)
	}
	if _, err := r.ReadAt(sb, 0); err != nil {
		return nil, fmt.Errorf("read log super block: %w", err)
	}
	le := binary.LittleEndian
	magic, version := le.Uint64(sb[0:]), le.Uint64(sb[8:])
	nr, ss := le.Uint64(sb[16:]), int64(le.Uint32(sb[24:]))
	if magic != Magic {
		return nil, fmt.Errorf("%w: magic %#x, want %#x", ErrFormat, magic, uint64(Magic))
	}
	if version != Version {
		return nil, fmt.Errorf("%w: version %d, want %d", ErrFormat, version, Version)
	}
	if ss < minSectorSize || ss > maxSectorSize || ss&(ss-1) != 0 {
		return nil, fmt.Errorf("%w: sector size %d is not a power of two from %d to %d", ErrFormat, ss, minSectorSize, maxSectorSize)
	}
	sectors := uint64(size / ss)
	// Every entry takes at least its header sector after the super block.
	if sectors == 0 || nr > sectors-1 {
		return nil, fmt.Errorf("%w: %d entries cannot fit a log of %d sectors of %d bytes", ErrFormat, nr, sectors, ss)
	}
	l := &Log{r: r, SectorSize: ss, Entries: make([]Entry, 0, nr)}
	hdr := make([]byte, ss)
	pos := uint64(1) // in sectors
	for i := range nr {
		if pos >= sectors {
			return nil, fmt.Errorf("%w: entry %d of %d starts at sector %d, past the end of the log (%d sectors)", ErrFormat, i, nr, pos, sectors)
		}
		if _, err := r.ReadAt(hdr, int64(pos)*ss); err != nil {
			return nil, fmt.Errorf("read log entry %d at sector %d: %w", i, pos, err)
		}
		e := Entry{
			Sector:  le.Uint64(hdr[0:]),
			Sectors: le.Uint64(hdr[8:]),
			Flags:   Flags(le.Uint64(hdr[16:])),
			dataOff: int64(pos+1) * ss,
		}
		dataLen := le.Uint64(hdr[24:])
		if e.Flags&^knownFlags != 0 {
			return nil, fmt.Errorf("%w: entry %d has unknown flags %s", ErrFormat, i, e.Flags)
		}
		if e.Sectors == 0 && e.Flags&(FlagFlush|FlagMark) == 0 {
			// The kernel logs no empty write; zeros here are not an entry.
			return nil, fmt.Errorf("%w: entry %d (%s) is empty", ErrFormat, i, e.Flags)
		}
		if e.Flags&FlagMark != 0 {
			if dataLen > uint64(ss-entrySize-1) {
				return nil, fmt.Errorf("%w: mark entry %d claims %d name bytes, more than a sector holds", ErrFormat, i, dataLen)
			}
			e.Mark = string(hdr[entrySize : entrySize+dataLen])
		} else if dataLen != 0 {
			// The kernel writes no private data for anything but marks.
			return nil, fmt.Errorf("%w: entry %d (%s) carries %d bytes of private data", ErrFormat, i, e.Flags, dataLen)
		}
		if e.Sectors > sectors || e.Sector > uint64(math.MaxInt64/ss)-e.Sectors {
			return nil, fmt.Errorf("%w: entry %d covers sectors %d+%d, out of range", ErrFormat, i, e.Sector, e.Sectors)
		}
		next := pos + 1
		if e.Flags&FlagDiscard == 0 {
			// The data follows the header.
			next += e.Sectors
			if next > sectors {
				return nil, fmt.Errorf("%w: entry %d's %d data sectors run past the end of the log", ErrFormat, i, e.Sectors)
			}
		}
		l.Entries = append(l.Entries, e)
		pos = next
	}
	return l, nil
}

// Mark returns the index of the entry that is the mark named name. It is an
// error if there is none or more than one.
func (l *Log) Mark(name string) (int, error) {
	found := -1
	for i, e := range l.Entries {
		if e.Flags&FlagMark == 0 || e.Mark != name {
			continue
		}
		if found >= 0 {
			return 0, fmt.Errorf("log has more than one mark %q (entries %d and %d)", name, found, i)
		}
		found = i
	}
	if found < 0 {
		return 0, fmt.Errorf("log has no mark %q", name)
	}
	return found, nil
}

// Marks returns the indexes of the mark entries, in log order.
func (l *Log) Marks() []int {
	var out []int
	for i, e := range l.Entries {
		if e.Flags&FlagMark != 0 {
			out = append(out, i)
		}
	}
	return out
}

// ReadData reads the data entry i wrote (its length is
// Entries[i].Length(l.SectorSize)) into p, which must be that long.
func (l *Log) ReadData(i int, p []byte) error {
	if i < 0 || i >= len(l.Entries) {
		return fmt.Errorf("log entry %d out of range (%d entries)", i, len(l.Entries))
	}
	e := l.Entries[i]
	if e.Flags&FlagDiscard != 0 {
		return fmt.Errorf("log entry %d is a discard: it has no data", i)
	}
	if int64(len(p)) != e.Length(l.SectorSize) {
		return fmt.Errorf("log entry %d holds %d bytes, not %d", i, e.Length(l.SectorSize), len(p))
	}
	if len(p) == 0 {
		return nil
	}
	if _, err := l.r.ReadAt(p, e.dataOff); err != nil {
		return fmt.Errorf("read data of log entry %d: %w", i, err)
	}
	return nil
}
