package ploop

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
)

// Layout constants of the on-disk format (docs/design.md §2).
const (
	// HeaderSize is the size of the image header; the BAT follows it.
	HeaderSize = 64
	// SectorSize is the unit of the header's offsets and sizes.
	SectorSize = 512
	// DefaultClusterSize is what Create uses when none is given (ploop's
	// and qemu-img's default).
	DefaultClusterSize = 1 << 20
	// MinClusterSize and MaxClusterSize bound the cluster size of version 2
	// images, which must be a power of two.
	MinClusterSize = 32 << 10
	MaxClusterSize = 64 << 20

	sigV1 = "WithoutFreeSpace" // BAT holds sector offsets
	sigV2 = "WithouFreSpacExt" // BAT holds cluster indexes

	headerVersion = 2
	// inUseMagic is the in-use mark of an image open for writing.
	inUseMagic = 0x746F6E59
	// qemu writes 16 heads and 32 sectors per track into the geometry.
	geometryHeads   = 16
	geometrySectors = 32
)

// ErrNotPloop says the bytes do not start with a ploop header signature.
var ErrNotPloop = errors.New("not a ploop image (bad signature)")

// Header is the decoded 64-byte image header.
type Header struct {
	// Version is the format version given by the signature: 1 for
	// "WithoutFreeSpace" (BAT entries are sector offsets), 2 for
	// "WithouFreSpacExt" (BAT entries are cluster indexes). The version
	// field on disk is 2 in both.
	Version   int
	Heads     uint32
	Cylinders uint32
	// Tracks is the cluster size in 512-byte sectors.
	Tracks     uint32
	BATEntries uint32
	// Sectors is the virtual size in 512-byte sectors (version 1 uses the
	// low 32 bits of the field).
	Sectors uint64
	InUse   uint32
	// DataOff is the first data sector.
	DataOff uint32
	Flags   uint32
	// ExtOff is the sector of the format-extension cluster, 0 for none.
	ExtOff uint64
}

// ClusterSize is the cluster size in bytes.
func (h *Header) ClusterSize() int64 { return int64(h.Tracks) * SectorSize }

// Size is the virtual disk size in bytes.
func (h *Header) Size() int64 { return int64(h.Sectors) * SectorSize }

// InUseMarked reports whether the in-use mark is set: the image was open for
// writing and not closed cleanly.
func (h *Header) InUseMarked() bool { return h.InUse == inUseMagic }

// batBytes is the size of the header plus the BAT.
func (h *Header) batBytes() int64 { return HeaderSize + 4*int64(h.BATEntries) }

// expectedDataOff is the data_off a fresh image has: the header and BAT
// rounded up to whole clusters (version 2) or sectors (version 1), in sectors.
func (h *Header) expectedDataOff() uint32 {
	unit := int64(SectorSize)
	if h.Version == 2 {
		unit = h.ClusterSize()
	}
	return uint32((h.batBytes() + unit - 1) / unit * unit / SectorSize)
}

// dataOffProblem describes what is wrong with data_off, or returns "".
// A data_off that is too small would let data overlap the BAT; a version 2
// one must also be cluster-aligned because entries are cluster indexes.
func (h *Header) dataOffProblem() string {
	switch {
	case h.DataOff == 0:
		return "data_off is 0"
	case int64(h.DataOff)*SectorSize < h.batBytes():
		return fmt.Sprintf("data_off %d sectors overlaps the BAT (%d bytes)", h.DataOff, h.batBytes())
	case h.Version == 2 && h.DataOff%h.Tracks != 0:
		return fmt.Sprintf("data_off %d sectors is not a multiple of the cluster size (%d sectors)", h.DataOff, h.Tracks)
	}
	return ""
}

// entryToOffset converts a BAT entry to a byte offset in the file.
func (h *Header) entryToOffset(e uint32) int64 {
	if h.Version == 1 {
		return int64(e) * SectorSize
	}
	return int64(e) * h.ClusterSize()
}

// offsetToEntry converts a byte offset in the file to a BAT entry; ok is
// false when the offset cannot be represented.
func (h *Header) offsetToEntry(off int64) (uint32, bool) {
	unit := int64(SectorSize)
	if h.Version == 2 {
		unit = h.ClusterSize()
	}
	if off%unit != 0 || off/unit > math.MaxUint32 {
		return 0, false
	}
	return uint32(off / unit), true
}

// ParseHeader decodes and validates the fields of a header that do not
// depend on the file: signature, version, cluster size and that the BAT
// covers the virtual size. data_off, the in-use mark and ext_off are checked
// against the file by Open and Check.
func ParseHeader(b []byte) (Header, error) {
	var h Header
	if len(b) < HeaderSize {
		return h, fmt.Errorf("header is %d bytes, want %d: %w", len(b), HeaderSize, ErrNotPloop)
	}
	switch string(b[:16]) {
	case sigV1:
		h.Version = 1
	case sigV2:
		h.Version = 2
	default:
		return h, ErrNotPloop
	}
	le := binary.LittleEndian
	if v := le.Uint32(b[16:]); v != headerVersion {
		return h, fmt.Errorf("unsupported header version %d (want %d)", v, headerVersion)
	}
	h.Heads = le.Uint32(b[20:])
	h.Cylinders = le.Uint32(b[24:])
	h.Tracks = le.Uint32(b[28:])
	h.BATEntries = le.Uint32(b[32:])
	h.Sectors = le.Uint64(b[36:])
	h.InUse = le.Uint32(b[44:])
	h.DataOff = le.Uint32(b[48:])
	h.Flags = le.Uint32(b[52:])
	h.ExtOff = le.Uint64(b[56:])
	if h.Version == 1 {
		h.Sectors &= math.MaxUint32
	}
	cs := h.ClusterSize()
	switch {
	case h.Tracks == 0:
		return h, errors.New("cluster size is 0")
	case h.Version == 2 && (bits.OnesCount32(h.Tracks) != 1 || cs < MinClusterSize || cs > MaxClusterSize):
		return h, fmt.Errorf("cluster size %d is not a power of two between %d and %d", cs, MinClusterSize, MaxClusterSize)
	case cs > MaxClusterSize:
		return h, fmt.Errorf("cluster size %d is above %d", cs, MaxClusterSize)
	case h.Sectors > math.MaxInt64/SectorSize:
		return h, fmt.Errorf("virtual size of %d sectors is too large", h.Sectors)
	}
	need := (h.Sectors + uint64(h.Tracks) - 1) / uint64(h.Tracks)
	if uint64(h.BATEntries) < need {
		return h, fmt.Errorf("BAT has %d entries, the virtual size of %d sectors needs %d", h.BATEntries, h.Sectors, need)
	}
	return h, nil
}

// Marshal encodes the header into its 64 on-disk bytes.
func (h *Header) Marshal() []byte {
	b := make([]byte, HeaderSize)
	h.put(b)
	return b
}

func (h *Header) put(b []byte) {
	if h.Version == 1 {
		copy(b, sigV1)
	} else {
		copy(b, sigV2)
	}
	le := binary.LittleEndian
	le.PutUint32(b[16:], headerVersion)
	le.PutUint32(b[20:], h.Heads)
	le.PutUint32(b[24:], h.Cylinders)
	le.PutUint32(b[28:], h.Tracks)
	le.PutUint32(b[32:], h.BATEntries)
	le.PutUint64(b[36:], h.Sectors)
	le.PutUint32(b[44:], h.InUse)
	le.PutUint32(b[48:], h.DataOff)
	le.PutUint32(b[52:], h.Flags)
	le.PutUint64(b[56:], h.ExtOff)
}

// ValidClusterSize reports whether n can be the cluster size of a new
// image: a power of two from MinClusterSize to MaxClusterSize.
func ValidClusterSize(n int64) error {
	if n < MinClusterSize || n > MaxClusterSize || bits.OnesCount64(uint64(n)) != 1 {
		return fmt.Errorf("cluster size %d is not a power of two between %d (32K) and %d (64M)", n, MinClusterSize, MaxClusterSize)
	}
	return nil
}

// newHeader builds the version 2 header qemu-img 7.2 writes for size bytes
// (rounded up to whole sectors) and clusterSize.
func newHeader(size, clusterSize int64) (Header, error) {
	if clusterSize == 0 {
		clusterSize = DefaultClusterSize
	}
	if err := ValidClusterSize(clusterSize); err != nil {
		return Header{}, err
	}
	if size <= 0 {
		return Header{}, fmt.Errorf("size %d must be positive", size)
	}
	sectors := (uint64(size) + SectorSize - 1) / SectorSize
	entries := (uint64(size) + uint64(clusterSize) - 1) / uint64(clusterSize)
	if entries > math.MaxUint32 || size > math.MaxInt64-clusterSize {
		return Header{}, fmt.Errorf("size %d needs more than %d clusters of %d bytes", size, uint32(math.MaxUint32), clusterSize)
	}
	h := Header{
		Version:    2,
		Heads:      geometryHeads,
		Cylinders:  uint32(uint64(size) / SectorSize / geometryHeads / geometrySectors), // truncated like qemu's cpu_to_le32
		Tracks:     uint32(clusterSize / SectorSize),
		BATEntries: uint32(entries),
		Sectors:    sectors,
	}
	h.DataOff = h.expectedDataOff()
	return h, nil
}
