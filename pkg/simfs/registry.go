package simfs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"golang.org/x/sys/unix"
)

const registryVersion = 1

// registry is the persistent state of a root. It is the only source of truth
// for which project ID belongs to which volume.
type registry struct {
	Version int `json:"version"`
	// NextProject is the lowest project ID that may still be allocated. It only
	// grows, so an ID once recorded is never handed out again.
	NextProject uint32                     `json:"nextProject"`
	Volumes     map[string]*volumeRecord   `json:"volumes"`
	Snapshots   map[string]*snapshotRecord `json:"snapshots"`
}

type volumeRecord struct {
	Project uint32 `json:"project"`
	Bytes   uint64 `json:"bytes"`
	Inodes  uint64 `json:"inodes"`
	// Source is the snapshot a volume was restored from ("" for empty volumes).
	Source string `json:"source,omitempty"`
	// Ready is false while the directory, its quota or its restored contents
	// are being made; a retried request finishes or redoes that work.
	Ready bool `json:"ready"`
}

type snapshotRecord struct {
	Source string `json:"source"`
	// Bytes and Inodes are the source volume's limits when the snapshot was
	// taken: the smallest volume a restore may go into.
	Bytes  uint64 `json:"bytes"`
	Inodes uint64 `json:"inodes"`
	// UsedBytes and UsedInodes are what the copied tree occupied in the source.
	UsedBytes  uint64 `json:"usedBytes"`
	UsedInodes uint64 `json:"usedInodes"`
	CreatedNs  int64  `json:"createdNs"`
	Ready      bool   `json:"ready"`
}

func newRegistry(first uint32) *registry {
	return &registry{
		Version:     registryVersion,
		NextProject: first,
		Volumes:     map[string]*volumeRecord{},
		Snapshots:   map[string]*snapshotRecord{},
	}
}

// parseRegistry decodes and validates a registry file. A registry that fails
// validation is never used: guessing would risk handing out a live project ID.
func parseRegistry(data []byte) (*registry, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var r registry
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("decode registry: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("decode registry: trailing data after the object")
	}
	if r.Version != registryVersion {
		return nil, fmt.Errorf("registry version %d, want %d", r.Version, registryVersion)
	}
	if r.NextProject == 0 {
		return nil, errors.New("registry nextProject is 0")
	}
	if r.Volumes == nil {
		r.Volumes = map[string]*volumeRecord{}
	}
	if r.Snapshots == nil {
		r.Snapshots = map[string]*snapshotRecord{}
	}
	owner := map[uint32]string{}
	for id, v := range r.Volumes {
		if err := ValidateID(id); err != nil {
			return nil, fmt.Errorf("registry volume: %w", err)
		}
		if v == nil {
			return nil, fmt.Errorf("registry volume %q is null", id)
		}
		if v.Project == 0 || v.Project == ^uint32(0) {
			return nil, fmt.Errorf("registry volume %q has invalid project ID %d", id, v.Project)
		}
		if v.Project >= r.NextProject {
			return nil, fmt.Errorf("registry volume %q has project ID %d not below nextProject %d", id, v.Project, r.NextProject)
		}
		if other, dup := owner[v.Project]; dup {
			return nil, fmt.Errorf("registry volumes %q and %q share project ID %d", other, id, v.Project)
		}
		owner[v.Project] = id
		if _, err := validateLimits(v.Bytes, v.Inodes); err != nil {
			return nil, fmt.Errorf("registry volume %q: %w", id, err)
		}
		if v.Source != "" {
			if err := ValidateID(v.Source); err != nil {
				return nil, fmt.Errorf("registry volume %q source: %w", id, err)
			}
		}
	}
	for id, s := range r.Snapshots {
		if err := ValidateID(id); err != nil {
			return nil, fmt.Errorf("registry snapshot: %w", err)
		}
		if s == nil {
			return nil, fmt.Errorf("registry snapshot %q is null", id)
		}
		if err := ValidateID(s.Source); err != nil {
			return nil, fmt.Errorf("registry snapshot %q source: %w", id, err)
		}
		if _, err := validateLimits(s.Bytes, s.Inodes); err != nil {
			return nil, fmt.Errorf("registry snapshot %q: %w", id, err)
		}
	}
	return &r, nil
}

func (r *registry) marshal() ([]byte, error) {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

func (r *registry) volumeIDs() []string {
	ids := make([]string, 0, len(r.Volumes))
	for id := range r.Volumes {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

func (r *registry) snapshotIDs() []string {
	ids := make([]string, 0, len(r.Snapshots))
	for id := range r.Snapshots {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// loadRegistry reads dir/registry.json; a missing file is a fresh registry.
func loadRegistry(dir string, first uint32) (*registry, error) {
	data, err := os.ReadFile(filepath.Join(dir, registryFile))
	if errors.Is(err, os.ErrNotExist) {
		return newRegistry(first), nil
	}
	if err != nil {
		return nil, fmt.Errorf("read registry: %w", err)
	}
	r, err := parseRegistry(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, registryFile), err)
	}
	return r, nil
}

// saveRegistry replaces dir/registry.json atomically: write a temporary file,
// fsync it, rename it over the old one, fsync the directory.
func saveRegistry(dir string, r *registry) error {
	data, err := r.marshal()
	if err != nil {
		return fmt.Errorf("encode registry: %w", err)
	}
	tmp := filepath.Join(dir, registryFile+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("save registry: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("save registry: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("save registry: fsync: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save registry: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, registryFile)); err != nil {
		return fmt.Errorf("save registry: %w", err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
