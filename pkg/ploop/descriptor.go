package ploop

import (
	"bytes"
	"crypto/rand"
	"encoding/xml"
	"fmt"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// DescriptorName is the file that describes a stack directory, as in OpenVZ
// ploop.
const DescriptorName = "DiskDescriptor.xml"

// TopGUID is the GUID OpenVZ ploop gives the top (writable) delta.
const TopGUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"

// NoParentGUID is the ParentGUID of the base delta.
const NoParentGUID = "{00000000-0000-0000-0000-000000000000}"

// MaxChain is the most deltas a stack may have (the OpenVZ limit).
const MaxChain = 127

// Image types in a descriptor: a ploop image or a raw ("Plain") file.
const (
	TypeCompressed = "Compressed"
	TypePlain      = "Plain"
)

// maxDescriptorSize bounds what ReadDescriptor reads; real descriptors are a
// few KiB even with 127 deltas.
const maxDescriptorSize = 1 << 20

// Descriptor is DiskDescriptor.xml: the disk's size, its images (deltas)
// and the snapshot tree linking them. Elements this package does not know
// are kept and written back unchanged, so that descriptors written by
// OpenVZ keep their extra fields.
type Descriptor struct {
	XMLName   xml.Name       `xml:"Parallels_disk_image"`
	Version   string         `xml:"Version,attr"`
	Params    DiskParameters `xml:"Disk_Parameters"`
	Storage   StorageData    `xml:"StorageData"`
	Snapshots SnapshotTree   `xml:"Snapshots"`
	Extra     []xmlElement   `xml:",any"`
}

// DiskParameters are the virtual disk's size (in sectors) and geometry.
type DiskParameters struct {
	DiskSize  uint64 `xml:"Disk_size"`
	Cylinders uint64 `xml:"Cylinders"`
	Heads     uint32 `xml:"Heads"`
	Sectors   uint32 `xml:"Sectors"`
	// Padding must be 0 (QEMU's interop notes: disks with padding 1 are
	// neither opened nor created).
	Padding uint32       `xml:"Padding"`
	Extra   []xmlElement `xml:",any"`
}

// StorageData lists the storages; this package writes and accepts one.
type StorageData struct {
	Storages []Storage    `xml:"Storage"`
	Extra    []xmlElement `xml:",any"`
}

// Storage covers sectors [Start, End) with images of Blocksize sectors per
// cluster.
type Storage struct {
	Start     uint64          `xml:"Start"`
	End       uint64          `xml:"End"`
	Blocksize uint32          `xml:"Blocksize"`
	Images    []DescriptorImg `xml:"Image"`
	Extra     []xmlElement    `xml:",any"`
}

// DescriptorImg is one delta: its GUID, type and file name (relative to the
// stack directory).
type DescriptorImg struct {
	GUID  string       `xml:"GUID"`
	Type  string       `xml:"Type"`
	File  string       `xml:"File"`
	Extra []xmlElement `xml:",any"`
}

// SnapshotTree names the top delta and each delta's parent. TopGUID is
// optional: without it the top is the image whose GUID is the predefined
// TopGUID.
type SnapshotTree struct {
	TopGUID string       `xml:"TopGUID,omitempty"`
	Shots   []Shot       `xml:"Shot"`
	Extra   []xmlElement `xml:",any"`
}

// Shot links a delta to the delta below it.
type Shot struct {
	GUID       string       `xml:"GUID"`
	ParentGUID string       `xml:"ParentGUID"`
	Extra      []xmlElement `xml:",any"`
}

// xmlElement keeps an element this package does not interpret.
type xmlElement struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
	Inner   []byte     `xml:",innerxml"`
}

var guidRE = regexp.MustCompile(`^\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}$`)

// NewGUID returns a random (version 4) GUID in braces, as ploop writes them.
func NewGUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("ploop: crypto/rand: %v", err)) // never fails on Linux
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("{%x-%x-%x-%x-%x}", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// ValidGUID reports whether s is a GUID in braces.
func ValidGUID(s string) bool { return guidRE.MatchString(s) }

// newDescriptor describes a one-delta stack of sectors sectors whose base
// file is file.
func newDescriptor(sectors uint64, clusterSize int64, file, typ string) *Descriptor {
	d := &Descriptor{
		XMLName: xml.Name{Local: "Parallels_disk_image"},
		Version: "1.0",
		Params: DiskParameters{
			DiskSize: sectors, Heads: 16, Sectors: 63,
			Cylinders: sectors / (16 * 63),
		},
		Storage: StorageData{Storages: []Storage{{
			Start: 0, End: sectors, Blocksize: uint32(clusterSize / SectorSize),
			Images: []DescriptorImg{{GUID: TopGUID, Type: typ, File: file}},
		}}},
		Snapshots: SnapshotTree{TopGUID: TopGUID, Shots: []Shot{{GUID: TopGUID, ParentGUID: NoParentGUID}}},
	}
	return d
}

// ParseDescriptor decodes and validates a DiskDescriptor.xml. It accepts
// only what this package can serve: one storage and a linear chain of at
// most MaxChain deltas, the base possibly Plain, the others Compressed.
func ParseDescriptor(b []byte) (*Descriptor, error) {
	if len(b) > maxDescriptorSize {
		return nil, fmt.Errorf("descriptor is %d bytes, more than %d", len(b), maxDescriptorSize)
	}
	var d Descriptor
	dec := xml.NewDecoder(bytes.NewReader(b))
	// Only UTF-8 (and its ASCII subset) is accepted; no entity expansion
	// beyond the XML built-ins happens in encoding/xml.
	dec.CharsetReader = func(charset string, r io.Reader) (io.Reader, error) {
		return nil, fmt.Errorf("unsupported charset %q", charset)
	}
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("parse descriptor: %w", err)
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return &d, nil
}

// Validate checks the descriptor's fields and that the snapshots form one
// linear chain covering every image.
func (d *Descriptor) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("invalid descriptor: %s: %w", fmt.Sprintf(format, args...), unix.EINVAL)
	}
	if d.XMLName.Local != "Parallels_disk_image" {
		return bad("root element is %q", d.XMLName.Local)
	}
	if d.Version != "1.0" {
		return bad("version %q, want 1.0", d.Version)
	}
	sz := d.Params.DiskSize
	if sz == 0 || sz > (1<<63-1)/SectorSize {
		return bad("Disk_size %d sectors", sz)
	}
	if len(d.Storage.Storages) != 1 {
		return bad("%d Storage elements, want 1", len(d.Storage.Storages))
	}
	st := &d.Storage.Storages[0]
	if st.Start != 0 || st.End != sz {
		return bad("storage covers sectors [%d,%d), want [0,%d)", st.Start, st.End, sz)
	}
	if bits.OnesCount32(st.Blocksize) != 1 || int64(st.Blocksize)*SectorSize < MinClusterSize || int64(st.Blocksize)*SectorSize > MaxClusterSize {
		return bad("Blocksize %d sectors is not a power of two from 32K to 64M", st.Blocksize)
	}
	if len(st.Images) == 0 || len(st.Images) > MaxChain {
		return bad("%d images, want 1 to %d", len(st.Images), MaxChain)
	}
	byGUID := map[string]*DescriptorImg{}
	files := map[string]bool{}
	for i := range st.Images {
		im := &st.Images[i]
		if !ValidGUID(im.GUID) || im.GUID == NoParentGUID {
			return bad("image GUID %q", im.GUID)
		}
		if byGUID[im.GUID] != nil {
			return bad("image GUID %s listed twice", im.GUID)
		}
		byGUID[im.GUID] = im
		if im.Type != TypeCompressed && im.Type != TypePlain {
			return bad("image %s has type %q (want Compressed or Plain)", im.GUID, im.Type)
		}
		if err := validFileName(im.File); err != nil {
			return bad("image %s: %v", im.GUID, err)
		}
		if files[im.File] {
			return bad("file %q used by two images", im.File)
		}
		files[im.File] = true
	}
	if d.Params.Padding != 0 {
		return bad("Padding %d (only 0 is supported)", d.Params.Padding)
	}
	if byGUID[d.top()] == nil {
		return bad("TopGUID %q is not an image", d.top())
	}
	if len(d.Snapshots.Shots) != len(st.Images) {
		return bad("%d Shot elements for %d images", len(d.Snapshots.Shots), len(st.Images))
	}
	parent := map[string]string{}
	for _, s := range d.Snapshots.Shots {
		if byGUID[s.GUID] == nil {
			return bad("Shot %q is not an image", s.GUID)
		}
		if _, dup := parent[s.GUID]; dup {
			return bad("Shot %s listed twice", s.GUID)
		}
		if s.ParentGUID != NoParentGUID && byGUID[s.ParentGUID] == nil {
			return bad("Shot %s has unknown parent %q", s.GUID, s.ParentGUID)
		}
		parent[s.GUID] = s.ParentGUID
	}
	// Walk down from the top: it must reach the base through every image.
	seen := map[string]bool{}
	g := d.top()
	for g != NoParentGUID {
		if seen[g] {
			return bad("snapshot chain loops at %s", g)
		}
		seen[g] = true
		p := parent[g]
		if p != NoParentGUID && byGUID[g].Type == TypePlain {
			return bad("image %s is Plain but not the base", g)
		}
		g = p
	}
	if len(seen) != len(st.Images) {
		return bad("the chain from the top covers %d of %d images (branched snapshot trees are not supported)", len(seen), len(st.Images))
	}
	return nil
}

// validFileName accepts a plain file name inside the stack directory.
func validFileName(f string) error {
	switch {
	case f == "" || f == "." || f == "..":
		return fmt.Errorf("file name %q", f)
	case strings.ContainsAny(f, "/\x00"):
		return fmt.Errorf("file name %q is not a plain name in the directory", f)
	case f == DescriptorName || strings.HasPrefix(f, DescriptorName+"."):
		return fmt.Errorf("file name %q is reserved", f)
	case len(f) > 255:
		return fmt.Errorf("file name of %d bytes is too long", len(f))
	}
	return nil
}

// top is the GUID of the top delta.
func (d *Descriptor) top() string {
	if d.Snapshots.TopGUID == "" {
		return TopGUID
	}
	return d.Snapshots.TopGUID
}

// Size is the virtual size in bytes.
func (d *Descriptor) Size() int64 { return int64(d.Params.DiskSize) * SectorSize }

// ClusterSize is the cluster size in bytes.
func (d *Descriptor) ClusterSize() int64 {
	return int64(d.Storage.Storages[0].Blocksize) * SectorSize
}

// Chain returns the images from the base to the top. The descriptor must
// be valid.
func (d *Descriptor) Chain() []DescriptorImg {
	imgs := d.Storage.Storages[0].Images
	byGUID := map[string]DescriptorImg{}
	for _, im := range imgs {
		byGUID[im.GUID] = im
	}
	parent := map[string]string{}
	for _, s := range d.Snapshots.Shots {
		parent[s.GUID] = s.ParentGUID
	}
	out := make([]DescriptorImg, 0, len(imgs))
	for g := d.top(); g != NoParentGUID; g = parent[g] {
		out = append(out, byGUID[g])
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// setChain rewrites the images and shots from a chain (base first) whose
// last element is the top. Extra elements of images and shots that stay
// are kept.
func (d *Descriptor) setChain(chain []DescriptorImg) {
	shotExtra := map[string][]xmlElement{}
	for _, s := range d.Snapshots.Shots {
		shotExtra[s.GUID] = s.Extra
	}
	st := &d.Storage.Storages[0]
	st.Images = append([]DescriptorImg(nil), chain...)
	d.Snapshots.Shots = d.Snapshots.Shots[:0:0]
	parent := NoParentGUID
	for _, im := range chain {
		d.Snapshots.Shots = append(d.Snapshots.Shots, Shot{GUID: im.GUID, ParentGUID: parent, Extra: shotExtra[im.GUID]})
		parent = im.GUID
	}
	d.Snapshots.TopGUID = chain[len(chain)-1].GUID
}

// setSize sets the virtual size in sectors and the geometry derived from it.
func (d *Descriptor) setSize(sectors uint64) {
	d.Params.DiskSize = sectors
	if d.Params.Heads != 0 && d.Params.Sectors != 0 {
		d.Params.Cylinders = sectors / (uint64(d.Params.Heads) * uint64(d.Params.Sectors))
	}
	d.Storage.Storages[0].End = sectors
}

// clone returns a deep enough copy to edit the chain.
func (d *Descriptor) clone() *Descriptor {
	c := *d
	c.Storage.Storages = append([]Storage(nil), d.Storage.Storages...)
	c.Storage.Storages[0].Images = append([]DescriptorImg(nil), d.Storage.Storages[0].Images...)
	c.Snapshots.Shots = append([]Shot(nil), d.Snapshots.Shots...)
	return &c
}

// Marshal encodes the descriptor as ploop writes it.
func (d *Descriptor) Marshal() ([]byte, error) {
	b, err := xml.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode descriptor: %w", err)
	}
	out := append([]byte(`<?xml version="1.0" encoding="UTF-8"?>`+"\n"), b...)
	return append(out, '\n'), nil
}

// ReadDescriptor reads and validates dir/DiskDescriptor.xml.
func ReadDescriptor(dir string) (*Descriptor, error) {
	p := filepath.Join(dir, DescriptorName)
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("read descriptor: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxDescriptorSize+1))
	if err != nil {
		return nil, fmt.Errorf("read descriptor %s: %w", p, err)
	}
	d, err := ParseDescriptor(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return d, nil
}

// WriteDescriptor replaces dir/DiskDescriptor.xml atomically: the new
// contents go to a temporary file that is fsynced and renamed over the old
// one, and the directory is fsynced.
func WriteDescriptor(dir string, d *Descriptor) error {
	return writeDescriptor(dir, d, nil)
}

func writeDescriptor(dir string, d *Descriptor, h *hooks) error {
	if err := d.Validate(); err != nil {
		return err
	}
	b, err := d.Marshal()
	if err != nil {
		return err
	}
	p := filepath.Join(dir, DescriptorName)
	tmp := p + ".tmp"
	if err := writeFileSync(tmp, b); err != nil {
		return fmt.Errorf("write descriptor %s: %w", p, err)
	}
	h.at("descriptor-tmp")
	sd := &stagedDescriptor{dir: dir, tmp: tmp, path: p}
	if err := sd.rename(); err != nil {
		return err
	}
	h.at("descriptor-renamed")
	return sd.sync()
}

// stagedDescriptor is a descriptor already durable in its temporary file:
// switching to it costs a rename and a directory fsync, which is what an
// online operation does while I/O is paused.
type stagedDescriptor struct {
	dir, tmp, path string
	faults         faultFunc
}

// stageDescriptor writes d to the temporary file next to the descriptor
// and makes it durable.
func stageDescriptor(dir string, d *Descriptor) (*stagedDescriptor, error) {
	if err := d.Validate(); err != nil {
		return nil, err
	}
	b, err := d.Marshal()
	if err != nil {
		return nil, err
	}
	p := filepath.Join(dir, DescriptorName)
	if err := writeFileSync(p+".tmp", b); err != nil {
		return nil, fmt.Errorf("write descriptor %s: %w", p, err)
	}
	return &stagedDescriptor{dir: dir, tmp: p + ".tmp", path: p}, nil
}

// rename switches to the staged descriptor; sync then makes the switch
// durable.
func (sd *stagedDescriptor) rename() error {
	if sd.faults != nil {
		if err := sd.faults("rename", sd.path); err != nil {
			return err
		}
	}
	if err := os.Rename(sd.tmp, sd.path); err != nil {
		return fmt.Errorf("write descriptor %s: %w", sd.path, err)
	}
	return nil
}

func (sd *stagedDescriptor) sync() error {
	if err := syncDir(sd.dir); err != nil {
		return fmt.Errorf("write descriptor %s: sync directory: %w", sd.path, err)
	}
	return nil
}

// discard removes a staged descriptor that will not be committed.
func (sd *stagedDescriptor) discard() { os.Remove(sd.tmp) }

func writeFileSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// hooks lets crash tests stop an operation between its steps. A nil
// *hooks does nothing.
type hooks struct {
	mu sync.Mutex // at may be called from several goroutines
	fn func(point string)
}

func (h *hooks) at(point string) {
	if h != nil && h.fn != nil {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.fn(point)
	}
}
