package catalog

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// recordVersion is the format of the JSON records; a record of another
// version is refused rather than misread.
const recordVersion = 1

// maxRecordSize bounds a record file: records are small, a large file is
// not one of ours.
const maxRecordSize = 64 << 10

// Record states. A record is written "creating" before anything else of the
// object exists and "deleting" before anything of it is removed, so that
// after a crash the record says what to finish or undo (see Open).
const (
	stateCreating = "creating"
	stateReady    = "ready"
	stateDeleting = "deleting"
)

// volumeRecord is the catalogue's entry for one volume.
type volumeRecord struct {
	Version int    `json:"version"`
	ID      string `json:"id"`
	Name    string `json:"name"`
	State   string `json:"state"`
	Type    Type   `json:"type"`
	// Size is the provisioned size in bytes (the rounded capacity).
	Size        int64  `json:"size"`
	FSType      string `json:"fsType"`
	ClusterSize int64  `json:"clusterSize,omitempty"`
	MkfsOptions string `json:"mkfsOptions,omitempty"`
	// Inodes is the simfs inode limit; InodesDefault says it was derived
	// from the size (and follows it on expansion).
	Inodes        uint64 `json:"inodes,omitempty"`
	InodesDefault bool   `json:"inodesDefault,omitempty"`
	Discard       string `json:"discard,omitempty"`
	// SourceSnapshot or SourceVolume is the content source, as requested.
	SourceSnapshot string `json:"sourceSnapshot,omitempty"`
	SourceVolume   string `json:"sourceVolume,omitempty"`
	// CloneSnapshot is, for a clone of a volume, the GUID of the ploop
	// snapshot of the source it was cloned from, or the id of the
	// temporary simfs snapshot the copy goes through.
	CloneSnapshot string `json:"cloneSnapshot,omitempty"`
	// PendingMerges lists GUIDs of deltas in this volume's chain that no
	// snapshot needs any more and that are to be merged (see trimChain).
	PendingMerges []string  `json:"pendingMerges,omitempty"`
	Created       time.Time `json:"created"`
}

// snapshotRecord is the catalogue's entry for one snapshot.
type snapshotRecord struct {
	Version      int    `json:"version"`
	ID           string `json:"id"`
	Name         string `json:"name"`
	State        string `json:"state"`
	Type         Type   `json:"type"`
	SourceVolume string `json:"sourceVolume"`
	// GUID is the ploop snapshot of the source volume's stack that this
	// snapshot's own stack was cloned from.
	GUID string `json:"guid,omitempty"`
	// Size is the source's size at the snapshot: the least a volume
	// restored from it can have.
	Size int64 `json:"size"`
	// FSType and ClusterSize are the source's, for restores.
	FSType      string    `json:"fsType"`
	ClusterSize int64     `json:"clusterSize,omitempty"`
	Created     time.Time `json:"created"`
}

func validState(s string) bool {
	return s == stateCreating || s == stateReady || s == stateDeleting
}

// decodeStrict parses exactly one JSON object with known fields only.
func decodeStrict(b []byte, v any) error {
	if len(b) > maxRecordSize {
		return fmt.Errorf("record is %d bytes, more than %d", len(b), maxRecordSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("trailing data after the record")
	}
	return nil
}

// parseVolumeRecord decodes and checks a volume record; file is the id its
// file name says it is ("" to skip that check).
func parseVolumeRecord(b []byte, file string) (*volumeRecord, error) {
	var r volumeRecord
	if err := decodeStrict(b, &r); err != nil {
		return nil, fmt.Errorf("volume record: %w", err)
	}
	typ, err := ParseVolumeID(r.ID)
	switch {
	case err != nil:
		return nil, fmt.Errorf("volume record: %w", err)
	case r.Version != recordVersion:
		return nil, fmt.Errorf("volume record %s: version %d, want %d", r.ID, r.Version, recordVersion)
	case file != "" && r.ID != file:
		return nil, fmt.Errorf("volume record %s is in the file of %s", r.ID, file)
	case typ != r.Type:
		return nil, fmt.Errorf("volume record %s: type %q does not match the id", r.ID, r.Type)
	case !validState(r.State):
		return nil, fmt.Errorf("volume record %s: state %q", r.ID, r.State)
	case len(r.Name) > maxNameLength:
		return nil, fmt.Errorf("volume record %s: name of %d bytes", r.ID, len(r.Name))
	case r.Size <= 0 || r.Size > MaxSize:
		return nil, fmt.Errorf("volume record %s: size %d", r.ID, r.Size)
	case r.SourceSnapshot != "" && r.SourceVolume != "":
		return nil, fmt.Errorf("volume record %s: two content sources", r.ID)
	}
	if r.SourceSnapshot != "" {
		if err := ValidateSnapshotID(r.SourceSnapshot); err != nil {
			return nil, fmt.Errorf("volume record %s: source: %w", r.ID, err)
		}
	}
	if r.SourceVolume != "" {
		if _, err := ParseVolumeID(r.SourceVolume); err != nil {
			return nil, fmt.Errorf("volume record %s: source: %w", r.ID, err)
		}
	}
	if r.CloneSnapshot != "" {
		if r.Type == Simfs {
			if err := ValidateSnapshotID(r.CloneSnapshot); err != nil {
				return nil, fmt.Errorf("volume record %s: clone snapshot: %w", r.ID, err)
			}
		} else if !ploop.ValidGUID(r.CloneSnapshot) {
			return nil, fmt.Errorf("volume record %s: clone snapshot %q is not a GUID", r.ID, r.CloneSnapshot)
		}
	}
	for _, g := range r.PendingMerges {
		if !ploop.ValidGUID(g) {
			return nil, fmt.Errorf("volume record %s: pending merge %q is not a GUID", r.ID, g)
		}
	}
	return &r, nil
}

func parseSnapshotRecord(b []byte, file string) (*snapshotRecord, error) {
	var r snapshotRecord
	if err := decodeStrict(b, &r); err != nil {
		return nil, fmt.Errorf("snapshot record: %w", err)
	}
	if err := ValidateSnapshotID(r.ID); err != nil {
		return nil, fmt.Errorf("snapshot record: %w", err)
	}
	typ, err := ParseVolumeID(r.SourceVolume)
	switch {
	case err != nil:
		return nil, fmt.Errorf("snapshot record %s: source: %w", r.ID, err)
	case r.Version != recordVersion:
		return nil, fmt.Errorf("snapshot record %s: version %d, want %d", r.ID, r.Version, recordVersion)
	case file != "" && r.ID != file:
		return nil, fmt.Errorf("snapshot record %s is in the file of %s", r.ID, file)
	case typ != r.Type:
		return nil, fmt.Errorf("snapshot record %s: type %q does not match the source", r.ID, r.Type)
	case !validState(r.State):
		return nil, fmt.Errorf("snapshot record %s: state %q", r.ID, r.State)
	case len(r.Name) > maxNameLength:
		return nil, fmt.Errorf("snapshot record %s: name of %d bytes", r.ID, len(r.Name))
	case r.Size <= 0 || r.Size > MaxSize:
		return nil, fmt.Errorf("snapshot record %s: size %d", r.ID, r.Size)
	case r.GUID != "" && !ploop.ValidGUID(r.GUID):
		return nil, fmt.Errorf("snapshot record %s: %q is not a GUID", r.ID, r.GUID)
	}
	return &r, nil
}

// records is the directory of one kind of record.
type records struct {
	dir string
}

const (
	recordSuffix = ".json"
	tmpSuffix    = ".tmp"
)

func (rs records) path(id string) string { return filepath.Join(rs.dir, id+recordSuffix) }

// write replaces the record of id atomically: a temporary file is written
// and fsynced, renamed over the record, and the directory fsynced.
func (rs records) write(id string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode record %s: %w", id, err)
	}
	b = append(b, '\n')
	p := rs.path(id)
	tmp := p + tmpSuffix
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("write record %s: %w", id, err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err == nil {
		err = syncDir(rs.dir)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write record %s: %w", id, err)
	}
	return nil
}

// remove deletes the record of id durably; a missing record is fine.
func (rs records) remove(id string) error {
	if err := os.Remove(rs.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove record %s: %w", id, err)
	}
	if err := syncDir(rs.dir); err != nil {
		return fmt.Errorf("remove record %s: %w", id, err)
	}
	return nil
}

// load reads every record, calling parse on each; temporary files of an
// interrupted write are removed (the record they were to replace, if any,
// is intact).
func (rs records) load(parse func(b []byte, id string) error) error {
	ents, err := os.ReadDir(rs.dir)
	if err != nil {
		return fmt.Errorf("read records: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		if strings.HasSuffix(name, recordSuffix+tmpSuffix) {
			if err := os.Remove(filepath.Join(rs.dir, name)); err != nil {
				return fmt.Errorf("remove %s: %w", name, err)
			}
			continue
		}
		id, ok := strings.CutSuffix(name, recordSuffix)
		if !ok || !e.Type().IsRegular() {
			return fmt.Errorf("%s: %s is not a record of this catalogue; move it away", rs.dir, name)
		}
		if err := checkSafe("record", id); err != nil {
			return fmt.Errorf("%s: %w", rs.dir, err)
		}
		b, err := readFileLimited(filepath.Join(rs.dir, name), maxRecordSize)
		if err != nil {
			return err
		}
		if err := parse(b, id); err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(rs.dir, name), err)
		}
	}
	return nil
}

func readFileLimited(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return b, nil
}

func syncDir(dir string) error {
	d, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
