package catalog

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

// diskDirs stands in for simfs.Root on hosts without project quota: plain
// directories and JSON files under the catalogue's simfs/ directory, so
// that its state survives a crash and a reopen like simfs's does. It tests
// the catalogue's logic for simfs volumes (records, idempotency, recovery,
// capacity), never quota itself: TestKernel uses the real simfs.Root.
type diskDirs struct {
	root string
	mu   sync.Mutex
	// notEnforced, when set, is what QuotaEnforced reports.
	notEnforced error
}

type diskMeta struct {
	Bytes, Inodes uint64
	Source        string
	Used          uint64
}

func openDiskDirs(dir string) (dirVolumes, error) {
	for _, sub := range []string{"", "volumes", "snapshots"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, err
		}
	}
	return &diskDirs{root: dir}, nil
}

func (d *diskDirs) QuotaEnforced() error {
	if d.notEnforced != nil {
		return fmt.Errorf("%w: %w", simfs.ErrQuotaNotEnforced, d.notEnforced)
	}
	return nil
}

func (d *diskDirs) VolumePath(id string) (string, error) {
	if err := simfs.ValidateID(id); err != nil {
		return "", err
	}
	return filepath.Join(d.root, "volumes", id), nil
}

func (d *diskDirs) meta(kind, id string) (*diskMeta, error) {
	b, err := os.ReadFile(filepath.Join(d.root, kind, id+".meta"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s %s: %w", kind, id, simfs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	var m diskMeta
	return &m, json.Unmarshal(b, &m)
}

func (d *diskDirs) putMeta(kind, id string, m *diskMeta) error {
	b, _ := json.Marshal(m)
	return os.WriteFile(filepath.Join(d.root, kind, id+".meta"), b, 0o600)
}

func copyFlat(src, dst string) (uint64, error) {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return 0, err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return 0, err
	}
	var used uint64
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			return 0, err
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			return 0, err
		}
		used += uint64(len(b))
	}
	return used, nil
}

func dirUsage(dir string) uint64 {
	ents, _ := os.ReadDir(dir)
	var n uint64
	for _, e := range ents {
		if info, err := e.Info(); err == nil {
			n += uint64(info.Size())
		}
	}
	return n
}

func (d *diskDirs) vol(id string, m *diskMeta) simfs.Volume {
	return simfs.Volume{ID: id, Path: filepath.Join(d.root, "volumes", id), Bytes: m.Bytes, Inodes: m.Inodes, Source: m.Source}
}

func (d *diskDirs) create(id string, bytes, inodes uint64, source string) (simfs.Volume, error) {
	if err := simfs.ValidateID(id); err != nil {
		return simfs.Volume{}, err
	}
	if err := d.QuotaEnforced(); err != nil {
		return simfs.Volume{}, err
	}
	bytes = (bytes + simfs.BlockSize - 1) / simfs.BlockSize * simfs.BlockSize
	if m, err := d.meta("volumes", id); err == nil {
		if m.Bytes != bytes || m.Inodes != inodes || m.Source != source {
			return simfs.Volume{}, simfs.ErrExists
		}
		return d.vol(id, m), nil
	}
	dir := filepath.Join(d.root, "volumes", id)
	if err := os.RemoveAll(dir); err != nil {
		return simfs.Volume{}, err
	}
	if source != "" {
		if _, err := copyFlat(filepath.Join(d.root, "snapshots", source), dir); err != nil {
			return simfs.Volume{}, err
		}
	} else if err := os.Mkdir(dir, 0o700); err != nil {
		return simfs.Volume{}, err
	}
	m := &diskMeta{Bytes: bytes, Inodes: inodes, Source: source}
	return d.vol(id, m), d.putMeta("volumes", id, m)
}

func (d *diskDirs) Create(id string, bytes, inodes uint64) (simfs.Volume, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.create(id, bytes, inodes, "")
}

func (d *diskDirs) Restore(id string, bytes, inodes uint64, source string) (simfs.Volume, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s, err := d.meta("snapshots", source)
	if err != nil {
		return simfs.Volume{}, err
	}
	if bytes < s.Used {
		return simfs.Volume{}, fmt.Errorf("snapshot uses %d bytes: %w", s.Used, simfs.ErrConflict)
	}
	return d.create(id, bytes, inodes, source)
}

func (d *diskDirs) Expand(id string, bytes, inodes uint64) (simfs.Volume, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.meta("volumes", id)
	if err != nil {
		return simfs.Volume{}, err
	}
	bytes = (bytes + simfs.BlockSize - 1) / simfs.BlockSize * simfs.BlockSize
	if inodes == 0 {
		inodes = m.Inodes
	}
	if bytes < m.Bytes || inodes < m.Inodes {
		return simfs.Volume{}, simfs.ErrConflict
	}
	m.Bytes, m.Inodes = bytes, inodes
	return d.vol(id, m), d.putMeta("volumes", id, m)
}

func (d *diskDirs) Get(id string) (simfs.Volume, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.meta("volumes", id)
	if err != nil {
		return simfs.Volume{}, err
	}
	return d.vol(id, m), nil
}

func (d *diskDirs) Usage(id string) (simfs.Usage, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.meta("volumes", id)
	if err != nil {
		return simfs.Usage{}, err
	}
	return simfs.Usage{Bytes: dirUsage(filepath.Join(d.root, "volumes", id)), BytesLimit: m.Bytes, InodesLimit: m.Inodes}, nil
}

func (d *diskDirs) Delete(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := os.RemoveAll(filepath.Join(d.root, "volumes", id)); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(d.root, "volumes", id+".meta")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (d *diskDirs) Snapshot(id, source string) (simfs.Snapshot, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if m, err := d.meta("snapshots", id); err == nil {
		if m.Source != source {
			return simfs.Snapshot{}, simfs.ErrExists
		}
		return simfs.Snapshot{ID: id, Source: source, Bytes: m.Bytes, UsedBytes: m.Used}, nil
	}
	v, err := d.meta("volumes", source)
	if err != nil {
		return simfs.Snapshot{}, err
	}
	used, err := copyFlat(filepath.Join(d.root, "volumes", source), filepath.Join(d.root, "snapshots", id))
	if err != nil {
		return simfs.Snapshot{}, err
	}
	m := &diskMeta{Bytes: v.Bytes, Inodes: v.Inodes, Source: source, Used: used}
	return simfs.Snapshot{ID: id, Source: source, Bytes: v.Bytes, UsedBytes: used, Created: time.Now()}, d.putMeta("snapshots", id, m)
}

func (d *diskDirs) GetSnapshot(id string) (simfs.Snapshot, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	m, err := d.meta("snapshots", id)
	if err != nil {
		return simfs.Snapshot{}, err
	}
	return simfs.Snapshot{ID: id, Source: m.Source, Bytes: m.Bytes, UsedBytes: m.Used}, nil
}

func (d *diskDirs) DeleteSnapshot(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := os.RemoveAll(filepath.Join(d.root, "snapshots", id)); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(d.root, "snapshots", id+".meta")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (d *diskDirs) Close() error { return nil }

// names lists the volumes or snapshots the fake holds.
func (d *diskDirs) names(kind string) []string {
	ents, _ := os.ReadDir(filepath.Join(d.root, kind))
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}
