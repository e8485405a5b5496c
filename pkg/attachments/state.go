package attachments

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/ploop-csi/ploop-csi/pkg/flock"
	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"golang.org/x/sys/unix"
)

// The state directory (Options.StateDir, by default
// <storage root>/nodes/<node id>) records what this node has staged, so
// that a restarted node plugin finds its volumes again:
//
//	lock                  flock held by the Manager that owns the node
//	volumes/<id>.json     one record per staged volume, replaced atomically
//
// A record is written before the step it announces (attach, mount,
// publish) and removed after the last undo step (Unstage), so a process
// killed at any point leaves a record of everything it may have made.
const (
	stateLockName   = "lock"
	stateVolumesDir = "volumes"
	recordSuffix    = ".json"
	recordVersion   = 1
	// maxRecordSize bounds what the parser reads of a record.
	maxRecordSize = 1 << 20
	// maxTargets bounds the publish targets of one volume.
	maxTargets = 256
)

// record is what the state directory keeps of one staged volume.
type record struct {
	Version  int    `json:"version"`
	VolumeID string `json:"volumeId"`
	Kind     Kind   `json:"kind"`
	// Path is the stack directory (ploop) or the volume directory (simfs).
	Path        string `json:"path"`
	StagingPath string `json:"stagingPath"`
	// Block: a ploop volume staged without a filesystem.
	Block         bool     `json:"block,omitempty"`
	FSType        string   `json:"fsType,omitempty"`
	MkfsOptions   []string `json:"mkfsOptions,omitempty"`
	MountOptions  []string `json:"mountOptions,omitempty"`
	OnlineDiscard bool     `json:"onlineDiscard,omitempty"`
	// Transport is how the volume reaches the kernel: nbd or ublk.
	// Records written before ublk existed have none: nbd.
	Transport Transport `json:"transport,omitempty"`
	// Device is the kernel device the volume was attached to
	// ("/dev/nbdN", "/dev/ublkbN"), recorded once the attach succeeded.
	Device string `json:"device,omitempty"`
	// Staged says every staging step finished.
	Staged  bool     `json:"staged"`
	Targets []target `json:"targets,omitempty"`
}

// target is one publish of a volume.
type target struct {
	Path     string `json:"path"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	// SingleWriter: the volume may have no other target meanwhile.
	SingleWriter bool `json:"singleWriter,omitempty"`
}

// clone returns a deep copy, so that entries can be replaced instead of
// changed in place.
func (r record) clone() record {
	r.MkfsOptions = slices.Clone(r.MkfsOptions)
	r.MountOptions = slices.Clone(r.MountOptions)
	r.Targets = slices.Clone(r.Targets)
	return r
}

// target returns the publish at path.
func (r *record) target(path string) (target, bool) {
	for _, t := range r.Targets {
		if t.Path == path {
			return t, true
		}
	}
	return target{}, false
}

// withoutTarget returns a copy of r without the publish at path.
func (r record) withoutTarget(path string) record {
	r = r.clone()
	r.Targets = slices.DeleteFunc(r.Targets, func(t target) bool { return t.Path == path })
	return r
}

// check validates a record as strictly as a request: a record is read
// from disk and drives mounts and device attaches after a restart.
func (r *record) check() error {
	if r.Version != recordVersion {
		return fmt.Errorf("record version %d, want %d: %w", r.Version, recordVersion, ErrInvalid)
	}
	if err := ValidateVolumeID(r.VolumeID); err != nil {
		return err
	}
	if err := checkAbs("volume path", r.Path); err != nil {
		return err
	}
	if err := checkAbs("staging path", r.StagingPath); err != nil {
		return err
	}
	switch r.Kind {
	case Ploop:
		if !r.Block && r.FSType != FSExt4 && r.FSType != FSXFS {
			return fmt.Errorf("filesystem %q: %w", r.FSType, ErrInvalid)
		}
		if r.Block && (r.FSType != "" || len(r.MkfsOptions) > 0 || len(r.MountOptions) > 0 || r.OnlineDiscard) {
			return fmt.Errorf("a block volume records a filesystem: %w", ErrInvalid)
		}
		switch r.Transport {
		case "", TransportNBD:
			if r.Device != "" {
				if _, err := nbd.ParseDevice(r.Device); err != nil || nbd.DevicePath(mustIndex(r.Device)) != r.Device {
					return fmt.Errorf("device %q: %w", r.Device, ErrInvalid)
				}
			}
		case TransportUblk:
			if r.Device != "" {
				if err := parseUblkDevice(r.Device); err != nil {
					return err
				}
			}
		default:
			return fmt.Errorf("transport %q: %w", r.Transport, ErrInvalid)
		}
	case Simfs:
		if r.Block || r.FSType != "" || len(r.MkfsOptions) > 0 || len(r.MountOptions) > 0 || r.OnlineDiscard || r.Device != "" || r.Transport != "" {
			return fmt.Errorf("a simfs volume records ploop parameters: %w", ErrInvalid)
		}
	default:
		return fmt.Errorf("kind %q: %w", r.Kind, ErrInvalid)
	}
	if err := checkOptions("mkfs option", r.MkfsOptions); err != nil {
		return err
	}
	if err := checkOptions("mount option", r.MountOptions); err != nil {
		return err
	}
	if len(r.Targets) > maxTargets {
		return fmt.Errorf("%d targets, more than %d: %w", len(r.Targets), maxTargets, ErrInvalid)
	}
	seen := map[string]bool{}
	for _, t := range r.Targets {
		if err := checkAbs("target path", t.Path); err != nil {
			return err
		}
		if seen[t.Path] {
			return fmt.Errorf("target %s recorded twice: %w", t.Path, ErrInvalid)
		}
		seen[t.Path] = true
	}
	return nil
}

func mustIndex(dev string) int {
	i, _ := nbd.ParseDevice(dev)
	return i
}

// parseRecord decodes a record strictly: unknown fields, trailing data and
// anything check refuses are errors.
func parseRecord(b []byte) (record, error) {
	var r record
	if len(b) > maxRecordSize {
		return r, fmt.Errorf("record is %d bytes, more than %d: %w", len(b), maxRecordSize, ErrInvalid)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return record{}, fmt.Errorf("decode record: %v: %w", err, ErrInvalid)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return record{}, fmt.Errorf("decode record: data after the record: %w", ErrInvalid)
	}
	if r.Kind == Ploop && r.Transport == "" {
		r.Transport = TransportNBD // written before ublk existed
	}
	if err := r.check(); err != nil {
		return record{}, fmt.Errorf("record of %q: %w", r.VolumeID, err)
	}
	// An empty list is written as none (omitempty): read it so, so that a
	// record reads the same after it was saved again.
	if len(r.MkfsOptions) == 0 {
		r.MkfsOptions = nil
	}
	if len(r.MountOptions) == 0 {
		r.MountOptions = nil
	}
	if len(r.Targets) == 0 {
		r.Targets = nil
	}
	return r, nil
}

// encode is the inverse of parseRecord.
func (r record) encode() ([]byte, error) {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// stateDir is the open state directory, locked by this process.
type stateDir struct {
	dir  string
	lock *os.File
}

// openStateDir creates dir if needed and takes its lock, so that two node
// plugins never manage the same node's volumes.
func openStateDir(dir string) (*stateDir, error) {
	if err := os.MkdirAll(filepath.Join(dir, stateVolumesDir), 0o700); err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	// Records drive mounts: the directory must be where it claims to be.
	if real, err := filepath.EvalSymlinks(dir); err != nil || real != dir {
		return nil, fmt.Errorf("state directory %s resolves to %q (%v): it must not be reached through a symlink: %w", dir, real, err, ErrInvalid)
	}
	f, err := os.OpenFile(filepath.Join(dir, stateLockName), os.O_CREATE|os.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	if err := flock.Exclusive(f); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state directory %s is locked by another node plugin process", dir)
		}
		return nil, fmt.Errorf("lock state directory %s: %w", dir, err)
	}
	return &stateDir{dir: dir, lock: f}, nil
}

func (s *stateDir) close() error { return s.lock.Close() }

func (s *stateDir) volumesDir() string { return filepath.Join(s.dir, stateVolumesDir) }

func (s *stateDir) recordPath(id string) string {
	return filepath.Join(s.volumesDir(), id+recordSuffix)
}

// write replaces the record of r.VolumeID atomically: a temporary file,
// fsynced, renamed into place, and the directory fsynced.
func (s *stateDir) write(r record) error {
	if err := r.check(); err != nil {
		return fmt.Errorf("write record of %s: %w", r.VolumeID, err)
	}
	b, err := r.encode()
	if err != nil {
		return fmt.Errorf("write record of %s: %w", r.VolumeID, err)
	}
	dir := s.volumesDir()
	f, err := os.CreateTemp(dir, "."+r.VolumeID+".tmp-*")
	if err != nil {
		return fmt.Errorf("write record of %s: %w", r.VolumeID, err)
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.recordPath(r.VolumeID))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write record of %s: %w", r.VolumeID, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("write record of %s: %w", r.VolumeID, err)
	}
	return nil
}

// remove drops the record of id; a missing record is fine.
func (s *stateDir) remove(id string) error {
	if err := os.Remove(s.recordPath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove record of %s: %w", id, err)
	}
	if err := syncDir(s.volumesDir()); err != nil {
		return fmt.Errorf("remove record of %s: %w", id, err)
	}
	return nil
}

// loaded is one record file found at start: the record, or why it could
// not be read.
type loaded struct {
	id  string
	rec record
	err error
}

// load reads every record. Temporary files of an interrupted write are
// removed (the record they were to replace is still in place); a record
// that does not parse is returned with its error, to be reported rather
// than acted on.
func (s *stateDir) load() ([]loaded, error) {
	ents, err := os.ReadDir(s.volumesDir())
	if err != nil {
		return nil, fmt.Errorf("read state directory: %w", err)
	}
	var out []loaded
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, ".") && strings.Contains(name, ".tmp-") {
			os.Remove(filepath.Join(s.volumesDir(), name))
			continue
		}
		id, ok := strings.CutSuffix(name, recordSuffix)
		if !ok || ValidateVolumeID(id) != nil || !e.Type().IsRegular() {
			// Not ours to interpret, and not ours to delete.
			continue
		}
		l := loaded{id: id}
		b, err := readBounded(filepath.Join(s.volumesDir(), name))
		if err == nil {
			l.rec, err = parseRecord(b)
		}
		if err == nil && l.rec.VolumeID != id {
			err = fmt.Errorf("record %s names volume %q", name, l.rec.VolumeID)
		}
		l.err = err
		out = append(out, l)
	}
	return out, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, maxRecordSize+1))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
