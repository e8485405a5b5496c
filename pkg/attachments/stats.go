package attachments

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"
	"unsafe"

	"github.com/ploop-csi/ploop-csi/pkg/mounts"
	"github.com/ploop-csi/ploop-csi/pkg/nbd"
	"golang.org/x/sys/unix"
)

// Condition says whether a volume works, and if not, what to do.
type Condition struct {
	Abnormal bool
	// Message tells a person what is wrong and what to do about it.
	Message string
}

// VolumeStats is a volume's usage and condition.
type VolumeStats struct {
	// Block: only TotalBytes is known (the device's size).
	Block                                 bool
	TotalBytes, UsedBytes, AvailableBytes int64
	TotalInodes, UsedInodes, FreeInodes   int64
	Condition                             Condition
}

// Stats reports a staged volume's usage — from its filesystem for ploop,
// from its quota for simfs — and its condition: abnormal, with a message
// a person can act on, when the nbd link is dead, the image is gone or
// needs repair, the filesystem logged errors, or the storage root is
// nearly full. volumePath is the staging path or a publish target.
func (m *Manager) Stats(ctx context.Context, volumeID, volumePath string) (VolumeStats, error) {
	if err := ValidateVolumeID(volumeID); err != nil {
		return VolumeStats{}, err
	}
	if err := m.checkMountPath("volume path", volumePath); err != nil {
		return VolumeStats{}, err
	}
	if err := m.checkOpen(); err != nil {
		return VolumeStats{}, err
	}
	v := m.get(volumeID)
	if v == nil || (v.rec.Kind != "" && !m.knowsPath(v, volumePath)) {
		return VolumeStats{}, fmt.Errorf("stats of %s at %s: %w", volumeID, volumePath, ErrNotStaged)
	}
	var st VolumeStats
	var problems []string
	if v.problem != "" {
		problems = append(problems, v.problem)
	}
	switch v.rec.Kind {
	case Ploop:
		st.Block = v.rec.Block
		problems = append(problems, m.ploopProblems(ctx, v, &st)...)
	case Simfs:
		problems = append(problems, m.simfsProblems(v, &st)...)
	}
	if p := m.rootProblem(); p != "" {
		problems = append(problems, p)
	}
	if len(problems) > 0 {
		st.Condition = Condition{Abnormal: true, Message: strings.Join(problems, "; ")}
	} else {
		st.Condition = Condition{Message: "volume is healthy"}
	}
	return st, nil
}

// ploopProblems fills the usage of a ploop volume and lists what is wrong
// with its link and filesystem.
func (m *Manager) ploopProblems(ctx context.Context, v *volume, st *VolumeStats) []string {
	if v.served == nil {
		if v.problem == "" {
			return []string{"the volume is recorded as staged but not attached: stage it again"}
		}
		return nil
	}
	dev := v.served.Device()
	if err := m.exportFailed(v.served); err != nil {
		return []string{fmt.Sprintf("the node plugin stopped serving the volume after an internal error (%v; its log has the details), so every I/O to %s fails while the other volumes carry on: stop the pods that use it, then unstage and stage it again, and report the error", err, dev)}
	}
	select {
	case <-v.served.Gone():
		return []string{fmt.Sprintf("the device %s was disconnected by someone else, so every I/O to the volume fails: stop the pods that use it, then unstage and stage it again", dev)}
	default:
	}
	if dev == "" {
		return []string{"the volume is no longer attached to a kernel device: unstage and stage it again"}
	}
	if index, err := nbd.ParseDevice(dev); err == nil {
		if bs, err := nbd.Backends(); err == nil && bs[index] != v.rec.VolumeID {
			return []string{fmt.Sprintf("the nbd link of %s is dead (the kernel shows backend %q): stop the pods that use the volume, then unstage and stage it again", dev, bs[index])}
		}
	}
	if err := probeDevice(ctx, dev); err != nil {
		return []string{fmt.Sprintf("the nbd link of %s is dead (%v), so every I/O to the volume fails: stop the pods that use it, then unstage and stage it again", dev, err)}
	}
	var problems []string
	if v.rec.Block {
		st.TotalBytes = v.served.Size()
		return nil
	}
	if mi, ok, err := mounts.Mounted(v.rec.StagingPath); err != nil || !ok || mi.Source != dev {
		return []string{fmt.Sprintf("the volume's filesystem is not mounted at its staging path %s: unstage and stage it again", v.rec.StagingPath)}
	}
	fsst, err := mounts.Stat(v.rec.StagingPath)
	if err != nil {
		return []string{fmt.Sprintf("cannot read the filesystem at %s: %v", v.rec.StagingPath, err)}
	}
	st.TotalBytes, st.UsedBytes, st.AvailableBytes = fsst.TotalBytes, fsst.UsedBytes(), fsst.AvailableBytes
	st.TotalInodes, st.UsedInodes, st.FreeInodes = fsst.TotalInodes, fsst.UsedInodes(), fsst.FreeInodes
	if v.rec.FSType == FSExt4 {
		n, err := mounts.Ext4Errors(dev)
		switch {
		case err == nil && n > 0:
			problems = append(problems, fmt.Sprintf("the ext4 filesystem on %s has logged %d errors (see the kernel log): stop the pods that use it, unstage it, and stage it again, which runs fsck", dev, n))
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			m.log.Error(err, "read ext4 error count", "volume", v.rec.VolumeID)
		}
	}
	return problems
}

// simfsProblems fills the usage of a simfs volume from its quota.
func (m *Manager) simfsProblems(v *volume, st *VolumeStats) []string {
	if _, err := os.Lstat(v.rec.Path); errors.Is(err, fs.ErrNotExist) {
		return []string{fmt.Sprintf("the volume's directory %s is gone: restore it or delete the volume", v.rec.Path)}
	}
	if m.opts.Dirs == nil {
		return []string{"this node has no simfs root"}
	}
	u, err := m.opts.Dirs.Usage(v.rec.VolumeID)
	if err != nil {
		return []string{fmt.Sprintf("cannot read the volume's quota: %v", err)}
	}
	st.TotalBytes, st.UsedBytes = int64(u.BytesLimit), int64(u.Bytes)
	st.AvailableBytes = max(int64(u.BytesLimit)-int64(u.Bytes), 0)
	st.TotalInodes, st.UsedInodes = int64(u.InodesLimit), int64(u.Inodes)
	st.FreeInodes = max(int64(u.InodesLimit)-int64(u.Inodes), 0)
	return nil
}

// rootProblem reports a storage root that is nearly full: free space
// below both MinFreeBytes and MinFreePercent of its size. Thin volumes
// then fail writes with ENOSPC however empty they look from inside.
func (m *Manager) rootProblem() string {
	st, err := mounts.Stat(m.opts.StorageRoot)
	if err != nil {
		return fmt.Sprintf("cannot read the storage root %s: %v", m.opts.StorageRoot, err)
	}
	if st.TotalBytes <= 0 {
		return ""
	}
	pct := float64(st.AvailableBytes) * 100 / float64(st.TotalBytes)
	if st.AvailableBytes < m.opts.MinFreeBytes && pct < m.opts.MinFreePercent {
		return fmt.Sprintf("the storage root %s is nearly full (%d MiB free, %.1f%%): writes to thin volumes will fail; free space there or move volumes away", m.opts.StorageRoot, st.AvailableBytes>>20, pct)
	}
	return ""
}

// probeTimeout bounds the read that checks a device's link.
const probeTimeout = 10 * time.Second

// probeDevice reads the device's first block, bypassing the page cache,
// to tell a live link from a dead one: a device disconnected under a
// mounted filesystem stays "connected" for the kernel's status (the mount
// holds it) but fails every request at once. The read runs aside, so a
// device whose I/O the kernel holds cannot hang the caller; it returns
// when the kernel answers.
func probeDevice(ctx context.Context, dev string) error {
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		buf := alignedBlock()
		_, err = f.ReadAt(buf, 0)
		done <- err
	}()
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("a read of %s did not return within %v", dev, probeTimeout)
	}
}

// alignedBlock is a 4 KiB buffer aligned for O_DIRECT.
func alignedBlock() []byte {
	const n = 4096
	b := make([]byte, 2*n)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (n - 1))
	if off != 0 {
		off = n - off
	}
	return b[off : off+n]
}
