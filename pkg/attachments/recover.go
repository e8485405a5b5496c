package attachments

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/mounts"
	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// recoverParallel bounds how many volumes recover at once: each re-attach
// must finish within the kernel's DeadConnTimeout, so they do not queue
// behind each other, but a node with hundreds of volumes should not open
// them all at the same instant.
const recoverParallel = 8

// recover rebuilds the Manager's view from the state directory and
// re-serves every volume that was attached. Failures are per volume: they
// become the volume's problem and never stop the others or New.
func (m *Manager) recover(ctx context.Context) error {
	found, err := m.state.load()
	if err != nil {
		return err
	}
	backends, err := nbd.Backends()
	if err != nil {
		// No nbd driver loaded: no device can be waiting for us.
		m.log.V(1).Info("no nbd backends to match", "err", err)
		backends = map[int]string{}
	}
	devices := map[string]string{}
	for i, id := range backends {
		devices[id] = nbd.DevicePath(i)
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, recoverParallel)
	for _, l := range found {
		if l.err != nil {
			m.log.Error(l.err, "unreadable state record: the volume is reported abnormal until it is unstaged", "volume", l.id)
			m.set(l.id, &volume{rec: record{VolumeID: l.id}, problem: fmt.Sprintf("the node's record of this volume is unreadable (%v): unstage it, then stage it again", l.err)})
			continue
		}
		m.set(l.id, &volume{rec: l.rec})
		if l.rec.Kind != Ploop {
			continue
		}
		dev, err := m.findDevice(l.id, l.rec.Transport, devices)
		if err != nil {
			m.log.Error(err, "look for the volume's device", "volume", l.id)
			m.setProblem(l.id, fmt.Sprintf("recovery could not look for the volume's device: %v", err))
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			m.recoverPloop(ctx, l.rec, dev)
		}()
	}
	wg.Wait()
	return nil
}

// recoverPloop brings one recorded ploop volume back:
//   - its device is still connected (the previous process was killed or
//     released it): repair the stack, reopen it and take the device over
//     before the kernel's DeadConnTimeout ends;
//   - no device, staging finished, nothing mounted at the staging path
//     (the node rebooted): stage it again, so that publishes work even if
//     the CO does not stage again;
//   - no device, staging unfinished: nothing to do until the CO repeats
//     Stage or calls Unstage;
//   - no device but the filesystem still mounted (someone disconnected
//     it): report it, touch nothing.
func (m *Manager) recoverPloop(ctx context.Context, rec record, dev string) {
	attached := dev != ""
	id := rec.VolumeID
	log := m.log.WithValues("volume", id)
	unlock, err := m.lockVolume(ctx, id)
	if err != nil {
		m.setProblem(id, fmt.Sprintf("recovery did not run: %v", err))
		return
	}
	defer unlock()
	start := time.Now()
	if problem := m.checkImage(rec); problem != "" {
		log.Error(nil, "volume cannot be recovered", "problem", problem)
		m.setProblem(id, problem)
		return
	}
	v := m.get(id)
	if attached {
		served, err := m.serve(ctx, rec)
		if err != nil {
			log.Error(err, "re-attach failed", "device", dev)
			m.setProblem(id, fmt.Sprintf("the node plugin could not serve the volume again after a restart, so its device %s fails I/O once the kernel stops waiting (ublk: holds it until unstaged): %v; fix the cause, then unstage and stage it again", dev, err))
			return
		}
		nv := &volume{rec: rec.clone(), served: served}
		if nv.rec.Device != served.Device() {
			nv.rec.Device = served.Device()
			if err := m.state.write(nv.rec); err != nil {
				log.Error(err, "record the device")
			}
		}
		m.set(id, nv)
		log.Info("re-attached after a restart", "device", served.Device(), "took", time.Since(start))
		if !rec.Block {
			// A process killed during a snapshot left the filesystem
			// frozen; thawing one that is not frozen does nothing.
			if mi, ok, _ := mounts.Mounted(rec.StagingPath); ok && mi.Source == served.Device() {
				if err := mounts.Thaw(rec.StagingPath); err != nil {
					log.Error(err, "thaw")
				}
			}
		}
		return
	}
	if !rec.Staged {
		return
	}
	if !rec.Block {
		if _, mounted, err := mounts.Mounted(rec.StagingPath); err != nil || mounted {
			m.setProblem(id, fmt.Sprintf("the volume's device was disconnected while its filesystem stayed mounted at %s: stop the pods that use it, then unstage and stage it again", rec.StagingPath))
			return
		}
	}
	if err := m.stagePloop(ctx, v); err != nil {
		log.Error(err, "stage again after a reboot")
		m.setProblem(id, fmt.Sprintf("the volume could not be staged again after the node restarted: %v; fix the cause, then unstage and stage it again", err))
		return
	}
	log.Info("staged again: its device was gone (node reboot)", "device", m.get(id).served.Device(), "took", time.Since(start))
}

// checkImage says why a recorded volume's image cannot be used, "" when
// it can be opened.
func (m *Manager) checkImage(rec record) string {
	if err := m.checkVolumePath(rec.Path); err != nil {
		return fmt.Sprintf("the node's record names an image outside the storage root (%v): unstage the volume", err)
	}
	if err := resolvesTo(rec.Path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Sprintf("the volume's image %s is gone: restore it, or unstage and delete the volume", rec.Path)
		}
		return fmt.Sprintf("the volume's image %s cannot be reached: %v", rec.Path, err)
	}
	if !ploop.IsStackDir(rec.Path) {
		return fmt.Sprintf("%s is no longer a ploop stack: restore it, or unstage and delete the volume", rec.Path)
	}
	return ""
}

// setProblem records why volume id is unusable.
func (m *Manager) setProblem(id, problem string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if v := m.vols[id]; v != nil {
		m.vols[id] = &volume{rec: v.rec, served: v.served, problem: problem}
	}
}
