package attachments

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/mounts"
	"github.com/ploop-csi/ploop-csi/pkg/nbd"
)

// StageRequest asks for a volume to be made ready on this node.
type StageRequest struct {
	VolumeID string
	Kind     Kind
	// Path is the volume's data: the stack directory of a ploop volume,
	// the directory of a simfs volume. It must lie below the storage root.
	Path string
	// StagingPath is where a ploop volume's filesystem is mounted.
	StagingPath string
	// Block stages a ploop volume without a filesystem: the device is
	// attached and bound onto the publish targets.
	Block bool
	// FSType is ext4 (the default) or xfs; made when the device is blank.
	FSType string
	// MkfsOptions are extra arguments to mkfs when it runs.
	MkfsOptions []string
	// MountOptions are the mount options of the staging mount.
	MountOptions []string
	// OnlineDiscard mounts with "discard", so that freed blocks return to
	// the storage root at once rather than at the next periodic trim.
	OnlineDiscard bool
	// Transport asks for nbd or ublk; "" takes the node's default, or
	// the transport the volume is already staged with.
	Transport Transport
}

// record turns a validated request into the record of a volume being
// staged.
func (r StageRequest) record() record {
	rec := record{
		Version:     recordVersion,
		VolumeID:    r.VolumeID,
		Kind:        r.Kind,
		Path:        r.Path,
		StagingPath: r.StagingPath,
		Block:       r.Block,
	}
	if r.Kind == Ploop {
		rec.Transport = r.Transport
	}
	if r.Kind == Ploop && !r.Block {
		rec.FSType = r.FSType
		rec.MkfsOptions = slices.Clone(r.MkfsOptions)
		rec.MountOptions = slices.Clone(r.MountOptions)
		rec.OnlineDiscard = r.OnlineDiscard
	}
	return rec
}

// check validates a request and fills its defaults.
func (m *Manager) checkStage(r *StageRequest) error {
	if err := ValidateVolumeID(r.VolumeID); err != nil {
		return err
	}
	if err := m.checkVolumePath(r.Path); err != nil {
		return err
	}
	if err := m.checkMountPath("staging path", r.StagingPath); err != nil {
		return err
	}
	if _, err := ParseTransport(string(r.Transport), false); err != nil {
		return fmt.Errorf("stage %s: %w", r.VolumeID, err)
	}
	if r.Kind != Ploop && r.Transport != "" {
		return fmt.Errorf("stage %s: only ploop volumes have a transport: %w", r.VolumeID, ErrInvalid)
	}
	switch r.Kind {
	case Ploop:
		if r.Block {
			if r.FSType != "" || len(r.MkfsOptions) > 0 || len(r.MountOptions) > 0 || r.OnlineDiscard {
				return fmt.Errorf("stage %s: a block volume takes no filesystem, mkfs or mount options: %w", r.VolumeID, ErrInvalid)
			}
			return nil
		}
		if r.FSType == "" {
			r.FSType = FSExt4
		}
		if r.FSType != FSExt4 && r.FSType != FSXFS {
			return fmt.Errorf("stage %s: filesystem %q is not ext4 or xfs: %w", r.VolumeID, r.FSType, ErrInvalid)
		}
		if err := checkOptions("mkfs option", r.MkfsOptions); err != nil {
			return err
		}
		return checkOptions("mount option", r.MountOptions)
	case Simfs:
		if r.Block || r.FSType != "" || len(r.MkfsOptions) > 0 || len(r.MountOptions) > 0 || r.OnlineDiscard {
			return fmt.Errorf("stage %s: a simfs volume is a directory; it takes no block access, filesystem or options: %w", r.VolumeID, ErrInvalid)
		}
		return nil
	}
	return fmt.Errorf("stage %s: kind %q is not ploop or simfs: %w", r.VolumeID, r.Kind, ErrInvalid)
}

// differs names the first parameter in which a repeated request differs
// from what was staged, "" when it asks for the same.
func (r record) differs(n record) string {
	switch {
	case r.Kind != n.Kind:
		return "kind"
	case r.Path != n.Path:
		return "volume path"
	case r.StagingPath != n.StagingPath:
		return "staging path"
	case r.Block != n.Block:
		return "access type (block or filesystem)"
	case r.FSType != n.FSType:
		return "filesystem"
	case !slices.Equal(r.MkfsOptions, n.MkfsOptions):
		return "mkfs options"
	case !slices.Equal(r.MountOptions, n.MountOptions):
		return "mount options"
	case r.OnlineDiscard != n.OnlineDiscard:
		return "discard mode"
	case r.Transport != n.Transport:
		return "transport (nbd or ublk)"
	}
	return ""
}

// Stage makes a volume ready on this node. A ploop volume's stack is
// opened (repaired if a killed server left it marked in use), served and
// attached to a kernel nbd device whose backend identifier is the volume
// id; unless Block, the device gets a filesystem when it is blank and is
// mounted at the staging path. A simfs volume is checked: its directory
// exists and its quota is set. The record of the volume is written before
// anything is attached, so a crash at any point is recoverable.
//
// Stage is idempotent: repeating it with the same request succeeds, and
// finishes a staging that was interrupted. The same volume with another
// staging path or other parameters is ErrConflict.
func (m *Manager) Stage(ctx context.Context, req StageRequest) error {
	if err := m.checkStage(&req); err != nil {
		return err
	}
	unlock, err := m.begin(ctx, req.VolumeID)
	if err != nil {
		return err
	}
	defer unlock()
	start := time.Now()
	err = m.stage(ctx, req)
	m.log.V(2).Info("stage", "volume", req.VolumeID, "kind", req.Kind, "stagingPath", req.StagingPath, "block", req.Block, "fsType", req.FSType, "took", time.Since(start), "err", err)
	return err
}

func (m *Manager) stage(ctx context.Context, req StageRequest) error {
	want := req.record()
	v := m.get(req.VolumeID)
	if want.Kind == Ploop && want.Transport == "" {
		// A volume keeps its transport until it is unstaged, whatever
		// the node's default has become.
		want.Transport = m.transport
		if v != nil && v.rec.Transport != "" {
			want.Transport = v.rec.Transport
		}
	}
	if v == nil && want.Transport == TransportUblk {
		if _, err := m.ublkControl(); err != nil {
			return fmt.Errorf("stage %s: %w", req.VolumeID, err)
		}
	}
	if v != nil {
		if d := v.rec.differs(want); d != "" {
			return fmt.Errorf("stage %s: staged at %s with another %s: %w", req.VolumeID, v.rec.StagingPath, d, ErrConflict)
		}
		if v.rec.Kind == "" {
			// An unreadable record: Unstage clears it.
			return fmt.Errorf("stage %s: %s: %w", req.VolumeID, v.problem, ErrUnavailable)
		}
	}
	if err := resolvesTo(req.Path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("stage %s: %s is gone: %w", req.VolumeID, req.Path, ErrUnavailable)
		}
		return fmt.Errorf("stage %s: volume path: %w", req.VolumeID, err)
	}
	if req.Kind == Simfs {
		if err := m.checkDir(req.VolumeID, req.Path); err != nil {
			return err
		}
		if v == nil || !v.rec.Staged {
			want.Staged = true
			_, err := m.save(v, want)
			return err
		}
		return nil
	}
	created := v == nil
	if created {
		var err error
		if v, err = m.save(nil, want); err != nil {
			return err
		}
	}
	err := m.stagePloop(ctx, v)
	if created && errors.Is(err, ErrServedElsewhere) {
		// Nothing was done here, and the record would make this node
		// claim (and at its next start try to serve) a volume another
		// process serves.
		if rerr := m.state.remove(req.VolumeID); rerr != nil {
			return errors.Join(err, rerr)
		}
		m.set(req.VolumeID, nil)
	}
	return err
}

// checkDir checks a simfs volume's directory against the simfs root:
// it is the directory the root has for the id, it exists, and its quota
// is enforced and set.
func (m *Manager) checkDir(id, path string) error {
	if m.opts.Dirs == nil {
		return fmt.Errorf("stage %s: this node has no simfs root: %w", id, ErrInvalid)
	}
	p, err := m.opts.Dirs.VolumePath(id)
	if err != nil {
		return fmt.Errorf("stage %s: %w", id, err)
	}
	if p != path {
		return fmt.Errorf("stage %s: the simfs root keeps it at %s, not %s: %w", id, p, path, ErrInvalid)
	}
	st, err := os.Lstat(path)
	if err != nil || !st.IsDir() {
		return fmt.Errorf("stage %s: directory %s: %v: %w", id, path, err, ErrUnavailable)
	}
	if err := m.opts.Dirs.QuotaEnforced(); err != nil {
		return fmt.Errorf("stage %s: %w", id, err)
	}
	u, err := m.opts.Dirs.Usage(id)
	if err != nil {
		return fmt.Errorf("stage %s: quota: %w", id, err)
	}
	if u.BytesLimit == 0 || u.InodesLimit == 0 {
		return fmt.Errorf("stage %s: the quota of %s has no limit (bytes %d, inodes %d): %w", id, path, u.BytesLimit, u.InodesLimit, ErrUnavailable)
	}
	return nil
}

// stagePloop carries out whatever staging steps of v are not done yet:
// serve and attach, then format and mount. Called with the volume locked;
// each step checks whether it already happened, so it also completes an
// interrupted staging and restages a volume after a reboot.
func (m *Manager) stagePloop(ctx context.Context, v *volume) error {
	id := v.rec.VolumeID
	if v.served == nil {
		served, err := m.serve(ctx, v.rec)
		if err != nil {
			return fmt.Errorf("stage %s: %w", id, err)
		}
		nv := &volume{rec: v.rec.clone(), served: served}
		nv.rec.Device = served.Device()
		if err := m.state.write(nv.rec); err != nil {
			// Without a record of the device, a restart could not find
			// it: undo the attach.
			served.Close(ctx)
			return err
		}
		m.set(id, nv)
		v = nv
	} else if dev := v.served.Device(); dev == "" {
		return fmt.Errorf("stage %s: served but not attached: %w", id, ErrUnavailable)
	}
	dev := v.served.Device()
	if !v.rec.Block {
		mi, mounted, err := mounts.Mounted(v.rec.StagingPath)
		if err != nil {
			return fmt.Errorf("stage %s: %w", id, err)
		}
		switch {
		case mounted && mi.Source != dev:
			return fmt.Errorf("stage %s: %s is mounted at the staging path %s, not %s: %w", id, mi.Source, v.rec.StagingPath, dev, ErrConflict)
		case !mounted:
			opts := slices.Clone(v.rec.MountOptions)
			if v.rec.OnlineDiscard && !slices.Contains(opts, "discard") {
				opts = append(opts, "discard")
			}
			if err := m.mounter.FormatAndMount(dev, v.rec.StagingPath, v.rec.FSType, v.rec.MkfsOptions, opts); err != nil {
				return fmt.Errorf("stage %s: %w", id, err)
			}
		}
	}
	if !v.rec.Staged || v.problem != "" {
		rec := v.rec.clone()
		rec.Staged = true
		if err := m.state.write(rec); err != nil {
			return err
		}
		m.set(id, &volume{rec: rec, served: v.served})
	}
	return nil
}

// Unstage undoes Stage: the staging mount is unmounted (and its directory
// removed), the image flushed, the device disconnected and the stack
// closed cleanly, and the record dropped. It is idempotent, including
// after a crash or restart: a volume not staged here, or staged but no
// longer attached, succeeds. A volume still published is ErrInUse.
func (m *Manager) Unstage(ctx context.Context, volumeID, stagingPath string) error {
	if err := ValidateVolumeID(volumeID); err != nil {
		return err
	}
	if err := m.checkMountPath("staging path", stagingPath); err != nil {
		return err
	}
	unlock, err := m.begin(ctx, volumeID)
	if err != nil {
		return err
	}
	defer unlock()
	start := time.Now()
	err = m.unstage(ctx, volumeID, stagingPath)
	m.log.V(2).Info("unstage", "volume", volumeID, "stagingPath", stagingPath, "took", time.Since(start), "err", err)
	return err
}

func (m *Manager) unstage(ctx context.Context, id, stagingPath string) error {
	v := m.get(id)
	if v == nil {
		return nil
	}
	if v.rec.Kind == "" {
		// The record could not be read: nothing is known to undo.
		m.set(id, nil)
		return m.state.remove(id)
	}
	if v.rec.StagingPath != stagingPath {
		return fmt.Errorf("unstage %s: staged at %s, not %s: %w", id, v.rec.StagingPath, stagingPath, ErrNotStaged)
	}
	// Publishes that are gone (a target removed behind our back) are
	// forgotten; live ones keep the volume.
	rec := v.rec.clone()
	for _, t := range v.rec.Targets {
		mounted, err := m.mounter.IsMountPoint(t.Path)
		if err != nil {
			return fmt.Errorf("unstage %s: %w", id, err)
		}
		if mounted {
			return fmt.Errorf("unstage %s: still published at %s: %w", id, t.Path, ErrInUse)
		}
		rec = rec.withoutTarget(t.Path)
	}
	if len(rec.Targets) != len(v.rec.Targets) {
		var err error
		if v, err = m.save(v, rec); err != nil {
			return err
		}
	}
	if v.rec.Kind == Ploop {
		if !v.rec.Block {
			if err := m.mounter.Unmount(stagingPath); err != nil {
				return fmt.Errorf("unstage %s: %w", id, err)
			}
		}
		if err := m.detach(ctx, v); err != nil {
			return fmt.Errorf("unstage %s: %w", id, err)
		}
	}
	if err := m.state.remove(id); err != nil {
		return err
	}
	m.set(id, nil)
	return nil
}

// detach closes the served stack (flush, disconnect, clean close) or,
// when this process does not serve it, disconnects a device still bound
// to the volume's backend identifier: its filesystem is unmounted, and
// the kernel would otherwise hold it until DeadConnTimeout and then fail
// it.
func (m *Manager) detach(ctx context.Context, v *volume) error {
	if v.served != nil {
		if err := v.served.Flush(); err != nil && !errors.Is(err, os.ErrClosed) {
			m.log.Error(err, "flush before detach", "volume", v.rec.VolumeID)
		}
		if err := v.served.Close(ctx); err != nil {
			return err
		}
		m.set(v.rec.VolumeID, &volume{rec: v.rec})
		return nil
	}
	if v.rec.Transport == TransportUblk {
		return m.removeUblk(ctx, v.rec.VolumeID)
	}
	index, err := nbd.FindBackend(v.rec.VolumeID)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	k, err := m.kernelConn()
	if err != nil {
		return err
	}
	m.log.Info("disconnect a device this process does not serve", "volume", v.rec.VolumeID, "device", nbd.DevicePath(index))
	return k.Disconnect(ctx, index)
}
