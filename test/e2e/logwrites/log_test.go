package logwrites

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// logBuilder writes a log in the kernel's format, for tests.
type logBuilder struct {
	ss      int64
	body    []byte // everything after the super block sector
	entries uint64
	// nrOverride, when set, is written as the entry count instead.
	nrOverride *uint64
}

func newBuilder(ss int64) *logBuilder { return &logBuilder{ss: ss} }

func (b *logBuilder) header(sector, sectors uint64, flags Flags, data []byte) {
	h := make([]byte, b.ss)
	le := binary.LittleEndian
	le.PutUint64(h[0:], sector)
	le.PutUint64(h[8:], sectors)
	le.PutUint64(h[16:], uint64(flags))
	le.PutUint64(h[24:], uint64(len(data)))
	copy(h[entrySize:], data)
	b.body = append(b.body, h...)
	b.entries++
}

func (b *logBuilder) write(sector uint64, data []byte, flags Flags) {
	if int64(len(data))%b.ss != 0 {
		panic("data not in whole sectors")
	}
	b.header(sector, uint64(int64(len(data))/b.ss), flags, nil)
	b.body = append(b.body, data...)
}

func (b *logBuilder) flush()                         { b.header(0, 0, FlagFlush, nil) }
func (b *logBuilder) discard(sector, sectors uint64) { b.header(sector, sectors, FlagDiscard, nil) }
func (b *logBuilder) mark(name string)               { b.header(0, 0, FlagMark, []byte(name)) }

func (b *logBuilder) bytes() []byte {
	sb := make([]byte, b.ss)
	le := binary.LittleEndian
	le.PutUint64(sb[0:], Magic)
	le.PutUint64(sb[8:], Version)
	nr := b.entries
	if b.nrOverride != nil {
		nr = *b.nrOverride
	}
	le.PutUint64(sb[16:], nr)
	le.PutUint32(sb[24:], uint32(b.ss))
	return append(sb, b.body...)
}

// memDev is an in-memory device.
type memDev []byte

func (d memDev) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(d)) {
		return 0, fmt.Errorf("write %d+%d outside a %d-byte device", off, len(p), len(d))
	}
	return copy(d[off:], p), nil
}

func fill(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestReplayEveryPrefix builds a random log while keeping the device state
// after every entry, and checks that replaying any prefix, from scratch or
// incrementally, yields exactly that state.
func TestReplayEveryPrefix(t *testing.T) {
	for _, ss := range []int64{512, 4096} {
		t.Run(fmt.Sprintf("sector%d", ss), func(t *testing.T) {
			const devSectors = 64
			r := rand.New(rand.NewPCG(uint64(ss), 1))
			b := newBuilder(ss)
			state := make([]byte, devSectors*ss)
			states := [][]byte{bytes.Clone(state)} // states[k]: after k entries
			marks := map[string]int{}
			for i := range 200 {
				switch k := r.IntN(10); {
				case k < 6:
					sector := uint64(r.IntN(devSectors))
					n := 1 + r.IntN(min(8, devSectors-int(sector)))
					data := fill(n*int(ss), uint64(i))
					flags := Flags(0)
					if r.IntN(4) == 0 {
						flags |= FlagFUA
					}
					if r.IntN(5) == 0 {
						flags |= FlagMetadata
					}
					if r.IntN(8) == 0 {
						flags |= FlagFlush // a flush with data
					}
					b.write(sector, data, flags)
					copy(state[int64(sector)*ss:], data)
				case k < 7:
					sector := uint64(r.IntN(devSectors))
					n := 1 + r.IntN(devSectors-int(sector))
					b.discard(sector, uint64(n))
					clear(state[int64(sector)*ss : int64(sector+uint64(n))*ss])
				case k < 9:
					b.flush()
				default:
					name := fmt.Sprintf("m%d", i)
					marks[name] = len(states) - 1
					b.mark(name)
				}
				states = append(states, bytes.Clone(state))
			}
			raw := b.bytes()
			l, err := Parse(bytes.NewReader(raw), int64(len(raw)))
			if err != nil {
				t.Fatal(err)
			}
			if l.SectorSize != ss || len(l.Entries) != len(states)-1 {
				t.Fatalf("parsed sector size %d and %d entries, want %d and %d", l.SectorSize, len(l.Entries), ss, len(states)-1)
			}
			inc := make(memDev, devSectors*ss)
			rinc := l.NewReplayer(inc, int64(len(inc)))
			for k := range states {
				dev := make(memDev, devSectors*ss)
				if err := l.NewReplayer(dev, int64(len(dev))).ReplayTo(k); err != nil {
					t.Fatalf("replay to %d: %v", k, err)
				}
				if !bytes.Equal(dev, states[k]) {
					t.Fatalf("replay of the first %d entries differs from the state after them", k)
				}
				if err := rinc.ReplayTo(k); err != nil {
					t.Fatalf("incremental replay to %d: %v", k, err)
				}
				if rinc.Applied() != k || !bytes.Equal(inc, states[k]) {
					t.Fatalf("incremental replay to %d (applied %d) differs from the state after them", k, rinc.Applied())
				}
			}
			for name, k := range marks {
				i, err := l.Mark(name)
				if err != nil {
					t.Fatal(err)
				}
				if i != k || l.Entries[i].Mark != name || l.Entries[i].Flags != FlagMark {
					t.Fatalf("mark %s at entry %d (%v), want %d", name, i, l.Entries[i], k)
				}
			}
			if got := len(l.Marks()); got != len(marks) {
				t.Fatalf("Marks() lists %d marks, want %d", got, len(marks))
			}
		})
	}
}

func TestReadData(t *testing.T) {
	b := newBuilder(512)
	data := fill(1024, 3)
	b.mark("before")
	b.write(5, data, FlagFUA)
	b.discard(0, 4)
	raw := b.bytes()
	l, err := Parse(bytes.NewReader(raw), int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1024)
	if err := l.ReadData(1, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("ReadData returned other bytes than were logged")
	}
	if e := l.Entries[1]; e.Offset(512) != 5*512 || e.Length(512) != 1024 || e.Flags != FlagFUA {
		t.Fatalf("entry 1 is %v (offset %d, length %d)", e, e.Offset(512), e.Length(512))
	}
	for _, tc := range []struct {
		i int
		n int
	}{{0, 1}, {1, 512}, {2, 2048}, {3, 0}, {-1, 0}} {
		if err := l.ReadData(tc.i, make([]byte, tc.n)); err == nil {
			t.Errorf("ReadData(%d, %d bytes) succeeded", tc.i, tc.n)
		}
	}
}

func TestMarkLookup(t *testing.T) {
	b := newBuilder(512)
	b.mark("a")
	b.flush()
	b.mark("b")
	b.mark("a")
	raw := b.bytes()
	l, err := Parse(bytes.NewReader(raw), int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	if i, err := l.Mark("b"); err != nil || i != 2 {
		t.Errorf("Mark(b) = %d, %v; want 2", i, err)
	}
	if _, err := l.Mark("a"); err == nil || !strings.Contains(err.Error(), "more than one") {
		t.Errorf("Mark(a) on a duplicated mark: %v", err)
	}
	if _, err := l.Mark("c"); err == nil {
		t.Error("Mark(c) found a mark that is not there")
	}
}

func TestReplayErrors(t *testing.T) {
	b := newBuilder(512)
	b.write(0, fill(512, 1), 0)
	b.write(7, fill(1024, 2), 0) // ends at byte 4608
	raw := b.bytes()
	l, err := Parse(bytes.NewReader(raw), int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	dev := make(memDev, 4096)
	r := l.NewReplayer(dev, int64(len(dev)))
	if err := r.ReplayTo(1); err != nil {
		t.Fatal(err)
	}
	if err := r.ReplayTo(2); err == nil || !strings.Contains(err.Error(), "past the end") {
		t.Errorf("replaying a write past the device end: %v", err)
	}
	if err := r.ReplayTo(0); err == nil {
		t.Error("replaying backwards succeeded")
	}
	if err := r.ReplayTo(3); err == nil {
		t.Error("replaying past the last entry succeeded")
	}
}

func TestParseErrors(t *testing.T) {
	valid := func() *logBuilder {
		b := newBuilder(512)
		b.write(1, fill(512, 1), 0)
		b.flush()
		b.mark("m")
		return b
	}
	le := binary.LittleEndian
	for _, tc := range []struct {
		name  string
		raw   func() []byte
		error string
	}{
		{"short", func() []byte { return valid().bytes()[:100] }, "shorter than a super block"},
		{"magic", func() []byte { r := valid().bytes(); r[0] ^= 1; return r }, "magic"},
		{"version", func() []byte { r := valid().bytes(); le.PutUint64(r[8:], 2); return r }, "version"},
		{"sector size zero", func() []byte { r := valid().bytes(); le.PutUint32(r[24:], 0); return r }, "sector size"},
		{"sector size odd", func() []byte { r := valid().bytes(); le.PutUint32(r[24:], 1000); return r }, "sector size"},
		{"sector size huge", func() []byte { r := valid().bytes(); le.PutUint32(r[24:], 1<<20); return r }, "sector size"},
		{"too many entries", func() []byte { b := valid(); n := uint64(1 << 40); b.nrOverride = &n; return b.bytes() }, "cannot fit"},
		{"entries past end", func() []byte { b := valid(); n := uint64(4); b.nrOverride = &n; return b.bytes() }, "past the end"},
		{"truncated data", func() []byte {
			b := newBuilder(512)
			b.write(0, fill(2048, 1), 0)
			return b.bytes()[:512*5]
		}, "run past the end"},
		{"unknown flag", func() []byte {
			b := newBuilder(512)
			b.header(0, 0, 1<<9, nil)
			return b.bytes()
		}, "unknown flags"},
		{"long mark", func() []byte {
			b := newBuilder(512)
			b.header(0, 0, FlagMark, nil)
			r := b.bytes()
			le.PutUint64(r[512+24:], 481)
			return r
		}, "name bytes"},
		{"empty write", func() []byte {
			b := newBuilder(512)
			b.header(3, 0, FlagFUA, nil)
			return b.bytes()
		}, "empty"},
		{"private data", func() []byte {
			b := newBuilder(512)
			b.header(0, 0, FlagFlush, []byte("x"))
			return b.bytes()
		}, "private data"},
		{"sector overflow", func() []byte {
			b := newBuilder(512)
			b.header(^uint64(0)-1, 1, 0, nil)
			return append(b.bytes(), make([]byte, 512)...)
		}, "out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := tc.raw()
			_, err := Parse(bytes.NewReader(raw), int64(len(raw)))
			if err == nil {
				t.Fatal("Parse accepted a malformed log")
			}
			if !strings.Contains(err.Error(), tc.error) {
				t.Fatalf("error %q does not mention %q", err, tc.error)
			}
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %q does not wrap ErrFormat", err)
			}
		})
	}
}

func TestMarkName(t *testing.T) {
	for _, name := range []string{"", "two words", "tab\tname", strings.Repeat("x", MaxMarkLen+1)} {
		if err := Mark("lw", name); err == nil {
			t.Errorf("Mark accepted the name %q", name)
		}
	}
	for _, dev := range []string{"", "a/b", strings.Repeat("d", 128)} {
		if err := Mark(dev, "m"); err == nil || !strings.Contains(err.Error(), "invalid device-mapper name") {
			t.Errorf("Mark on device %q: %v", dev, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	b := newBuilder(512)
	b.write(2, fill(1024, 1), FlagFUA)
	b.discard(0, 3)
	b.flush()
	b.mark("point")
	f.Add(b.bytes())
	b4 := newBuilder(4096)
	b4.write(1, fill(4096, 2), FlagFlush|FlagFUA)
	b4.mark("x")
	f.Add(b4.bytes())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, raw []byte) {
		l, err := Parse(bytes.NewReader(raw), int64(len(raw)))
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v does not wrap ErrFormat", err)
			}
			return
		}
		end := l.SectorSize
		for i, e := range l.Entries {
			if e.dataOff != end+l.SectorSize {
				t.Fatalf("entry %d data at %d, want %d", i, e.dataOff, end+l.SectorSize)
			}
			end = e.dataOff
			if e.Flags&FlagDiscard == 0 {
				end += e.Length(l.SectorSize)
				if err := l.ReadData(i, make([]byte, e.Length(l.SectorSize))); err != nil {
					t.Fatalf("entry %d: %v", i, err)
				}
			}
			if end > int64(len(raw)) {
				t.Fatalf("entry %d ends at %d, past the %d-byte log", i, end, len(raw))
			}
		}
		for _, i := range l.Marks() {
			if j, err := l.Mark(l.Entries[i].Mark); err == nil && j != i {
				t.Fatalf("Mark(%q) = %d, want %d", l.Entries[i].Mark, j, i)
			}
		}
		dev := make(memDev, 64<<10)
		r := l.NewReplayer(dev, int64(len(dev)))
		for n := range len(l.Entries) + 1 {
			if err := r.ReplayTo(n); err != nil {
				break // an entry beyond the small device
			}
		}
	})
}
