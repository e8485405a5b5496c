package attachments

import (
	"context"
	"fmt"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/mounts"
)

// Trim discards the free space of a staged ploop filesystem (FITRIM) and
// returns the bytes the filesystem discarded. The discards reach the
// volume's top delta as NBD TRIM requests and become holes there, so the
// space returns to the storage root.
func (m *Manager) Trim(ctx context.Context, volumeID string) (uint64, error) {
	if err := ValidateVolumeID(volumeID); err != nil {
		return 0, err
	}
	unlock, err := m.begin(ctx, volumeID)
	if err != nil {
		return 0, err
	}
	defer unlock()
	return m.trim(volumeID)
}

func (m *Manager) trim(id string) (uint64, error) {
	v := m.get(id)
	if v == nil || v.rec.Kind != Ploop || v.rec.Block || !v.rec.Staged {
		return 0, fmt.Errorf("trim %s: not a staged ploop filesystem: %w", id, ErrNotStaged)
	}
	if v.served == nil || v.served.Device() == "" {
		return 0, fmt.Errorf("trim %s: not attached: %w", id, ErrNotAttached)
	}
	if mi, ok, err := mounts.Mounted(v.rec.StagingPath); err != nil || !ok || mi.Source != v.served.Device() {
		return 0, fmt.Errorf("trim %s: its filesystem is not mounted at %s: %w", id, v.rec.StagingPath, ErrNotStaged)
	}
	start := time.Now()
	n, err := mounts.Trim(v.rec.StagingPath)
	m.log.V(2).Info("trim", "volume", id, "bytes", n, "took", time.Since(start), "err", err)
	return n, err
}

// trimLoop trims every staged ploop filesystem each TrimInterval. A
// volume busy with another operation is skipped until the next round.
func (m *Manager) trimLoop(ctx context.Context) {
	defer m.wg.Done()
	t := time.NewTicker(m.opts.TrimInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.trimPass(ctx)
		if m.opts.afterTrimPass != nil {
			m.opts.afterTrimPass()
		}
	}
}

func (m *Manager) trimPass(ctx context.Context) {
	m.mu.Lock()
	var ids []string
	for id, v := range m.vols {
		if v.rec.Kind == Ploop && !v.rec.Block && v.rec.Staged && v.served != nil {
			ids = append(ids, id)
		}
	}
	m.mu.Unlock()
	for _, id := range ids {
		if ctx.Err() != nil {
			return
		}
		unlock, ok := m.locks.TryLock(id)
		if !ok {
			continue
		}
		// A volume unstaged since the list was made is skipped.
		if m.get(id) != nil {
			if _, err := m.trim(id); err != nil {
				m.log.Error(err, "periodic trim", "volume", id)
			}
		}
		unlock()
	}
}
