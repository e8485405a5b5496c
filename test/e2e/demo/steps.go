package demo

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

func (s *session) stepVolume(ctx context.Context) error {
	s.note("A thin ploop image is made under the storage root; its file system comes at stage time.")
	v, err := s.createVolume(ctx, &csi.CreateVolumeRequest{
		Name: "demo-volume", Parameters: map[string]string{"type": "ploop"},
		CapacityRange:      &csi.CapacityRange{RequiredBytes: volumeMiB << 20},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4")},
	})
	if err != nil {
		return err
	}
	s.vol = v
	if _, err := s.sh(ctx, "ls -sh $W/disk/root/ploop/volumes/"+v.GetVolumeId()); err != nil {
		return err
	}
	s.note("(ls -s: the space each file takes on the root; the image is thin.)")
	if _, err := s.stageAndPublish(ctx, v, "volume", mountCap("ext4"),
		"the driver serves the image with its own NBD server to a kernel nbd device, makes ext4 on it, mounts it"); err != nil {
		return err
	}
	out, err := s.sh(ctx, "findmnt -n -o SOURCE,FSTYPE,SIZE $W/staging/volume")
	if err != nil {
		return err
	}
	f := strings.Fields(out)
	if len(f) < 2 || !strings.HasPrefix(f[0], "/dev/nbd") || f[1] != "ext4" {
		return fmt.Errorf("the staging path is not ext4 on an nbd device: %q", out)
	}
	s.note("the kernel's nbd device names the volume it serves:")
	out, err = s.sh(ctx, "cat /sys/block/"+strings.TrimPrefix(f[0], "/dev/")+"/backend")
	if err != nil {
		return err
	}
	if strings.TrimSpace(out) != v.GetVolumeId() {
		return fmt.Errorf("%s serves %q, not %s", f[0], out, v.GetVolumeId())
	}
	s.note("a pod writes into the published path:")
	if _, err := s.sh(ctx, "echo 'written before the snapshot' > $W/pods/volume/before.txt"); err != nil {
		return err
	}
	if _, err := s.sh(ctx, fmt.Sprintf("head -c %dM /dev/urandom > $W/pods/volume/data.bin", dataMiB)); err != nil {
		return err
	}
	_, err = s.sh(ctx, "cd $W/pods/volume && sha256sum data.bin | tee $W/data.sha256")
	return err
}

func (s *session) stepSnapshot(ctx context.Context) error {
	s.note("A snapshot holds what the device holds: flush the page cache first.")
	if _, err := s.sh(ctx, "sync"); err != nil {
		return err
	}
	src := s.vol.GetVolumeId()
	s.printf("> CreateSnapshot name=demo-snapshot source_volume_id=%s\n", src)
	s.note("O(1) and online: the process serving the volume freezes its top delta and starts a new one")
	resp, err := s.ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "demo-snapshot", SourceVolumeId: src})
	if err != nil {
		return fmt.Errorf("CreateSnapshot: %w", err)
	}
	snap := resp.GetSnapshot()
	s.snapshots = append(s.snapshots, snap.GetSnapshotId())
	s.printf("< snapshot_id=%s size_bytes=%s ready_to_use=%v\n", snap.GetSnapshotId(), size(snap.GetSizeBytes()), snap.GetReadyToUse())
	if !snap.GetReadyToUse() {
		return errors.New("the snapshot is not ready to use")
	}
	s.note("the volume goes on; this file is not in the snapshot:")
	if _, err := s.sh(ctx, "echo 'written after the snapshot' > $W/pods/volume/after.txt && ls $W/pods/volume"); err != nil {
		return err
	}
	s.note("Restore: a new volume whose content source is the snapshot (a copy-on-write clone, O(1)).")
	restored, err := s.createVolume(ctx, &csi.CreateVolumeRequest{
		Name: "demo-restored", Parameters: map[string]string{"type": "ploop"},
		CapacityRange:       &csi.CapacityRange{RequiredBytes: volumeMiB << 20},
		VolumeCapabilities:  []*csi.VolumeCapability{mountCap("ext4")},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}},
	})
	if err != nil {
		return err
	}
	if _, err := s.stageAndPublish(ctx, restored, "restored", mountCap("ext4"),
		"the clone already has ext4: it is attached and mounted, not formatted"); err != nil {
		return err
	}
	s.note("the restored volume has the snapshot's files, and not the file written after it:")
	out, err := s.sh(ctx, "ls $W/pods/restored && cat $W/pods/restored/before.txt")
	if err != nil {
		return err
	}
	if !strings.Contains(out, "written before the snapshot") {
		return fmt.Errorf("before.txt of the restored volume: %q", out)
	}
	if _, err := os.Lstat(filepath.Join(s.work, "pods", "restored", "after.txt")); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("after.txt, written after the snapshot, is in the restored volume (%v)", err)
	}
	_, err = s.sh(ctx, "cd $W/pods/restored && sha256sum -c $W/data.sha256")
	return err
}

func (s *session) stepExpand(ctx context.Context) error {
	target := filepath.Join(s.work, "pods", "volume")
	before, err := s.dfBytes(ctx, target)
	if err != nil {
		return err
	}
	id := s.vol.GetVolumeId()
	newSize := int64(expandedMiB) << 20
	s.printf("> ControllerExpandVolume volume_id=%s required_bytes=%s\n", id, size(newSize))
	s.note("the stack grows while it is attached: the process serving it does it")
	cresp, err := s.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: newSize}, VolumeCapability: mountCap("ext4")})
	if err != nil {
		return fmt.Errorf("ControllerExpandVolume: %w", err)
	}
	s.printf("< capacity_bytes=%s node_expansion_required=%v\n", size(cresp.GetCapacityBytes()), cresp.GetNodeExpansionRequired())
	if cresp.GetCapacityBytes() < newSize || !cresp.GetNodeExpansionRequired() {
		return errors.New("ControllerExpandVolume: want the new size and a node expansion")
	}
	s.printf("> NodeExpandVolume volume_id=%s volume_path=%s required_bytes=%s\n", id, s.short(target), size(newSize))
	s.note("the nbd device takes the new size, then resize2fs grows the mounted ext4")
	nresp, err := s.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target,
		StagingTargetPath: filepath.Join(s.work, "staging", "volume"),
		CapacityRange:     &csi.CapacityRange{RequiredBytes: newSize}, VolumeCapability: mountCap("ext4")})
	if err != nil {
		return fmt.Errorf("NodeExpandVolume: %w", err)
	}
	s.printf("< capacity_bytes=%s\n", size(nresp.GetCapacityBytes()))
	after, err := s.dfBytes(ctx, target)
	if err != nil {
		return err
	}
	if grown := after - before; grown < (expandedMiB-volumeMiB)*9/10<<20 {
		return fmt.Errorf("the file system grew by %d bytes, want about %d MiB", grown, expandedMiB-volumeMiB)
	}
	_, err = s.sh(ctx, "cd $W/pods/volume && sha256sum -c $W/data.sha256")
	return err
}

// dfBytes shows df of path and returns its file system's size.
func (s *session) dfBytes(ctx context.Context, path string) (int64, error) {
	if _, err := s.sh(ctx, "df -h "+s.short(path)); err != nil {
		return 0, err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return int64(st.Blocks) * st.Bsize, nil
}

func (s *session) stepSimfs(ctx context.Context) error {
	s.note("A StorageClass with parameters type=simfs: a directory of the storage root, limited by project quota.")
	v, err := s.createVolume(ctx, &csi.CreateVolumeRequest{
		Name: "demo-simfs", Parameters: map[string]string{"type": "simfs"},
		CapacityRange:      &csi.CapacityRange{RequiredBytes: simfsMiB << 20},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("")},
	})
	if err != nil {
		return err
	}
	target, err := s.stageAndPublish(ctx, v, "simfs", mountCap(""), "no device: the driver checks the directory and its quota")
	if err != nil {
		return err
	}
	if _, err := s.stats(ctx, v.GetVolumeId(), target); err != nil {
		return err
	}
	s.note("A non-root writer (uid %d) is stopped at the limit (root, holding CAP_SYS_RESOURCE, is not):", nobody)
	out, err := s.shAllowFail(ctx, fmt.Sprintf("setpriv --reuid %d --regid %d --clear-groups dd if=/dev/zero of=$W/pods/simfs/fill bs=1M count=%d",
		nobody, nobody, 2*simfsMiB))
	if err == nil {
		return fmt.Errorf("dd of %d MiB into a %d MiB simfs volume succeeded", 2*simfsMiB, simfsMiB)
	}
	if !strings.Contains(out, "Disk quota exceeded") {
		return fmt.Errorf("dd into a full simfs volume failed, but not with EDQUOT: %v: %s", err, out)
	}
	s.note("dd failed with EDQUOT, as it should.")
	if _, err := s.sh(ctx, "ls -lh $W/pods/simfs"); err != nil {
		return err
	}
	fi, err := os.Stat(filepath.Join(target, "fill"))
	if err != nil {
		return err
	}
	if fi.Size() == 0 || fi.Size() > simfsMiB<<20 {
		return fmt.Errorf("the writer wrote %d bytes into a %d MiB volume", fi.Size(), simfsMiB)
	}
	used, err := s.stats(ctx, v.GetVolumeId(), target)
	if err != nil {
		return err
	}
	if used < fi.Size() {
		return fmt.Errorf("NodeGetVolumeStats reports %d bytes used, the file has %d", used, fi.Size())
	}
	return nil
}

// stats calls NodeGetVolumeStats, prints it and returns the bytes used.
func (s *session) stats(ctx context.Context, id, path string) (int64, error) {
	s.printf("> NodeGetVolumeStats volume_id=%s volume_path=%s\n", id, s.short(path))
	resp, err := s.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: path})
	if err != nil {
		return 0, fmt.Errorf("NodeGetVolumeStats: %w", err)
	}
	var used int64
	var parts []string
	for _, u := range resp.GetUsage() {
		switch u.GetUnit() {
		case csi.VolumeUsage_BYTES:
			used = u.GetUsed()
			parts = append(parts, fmt.Sprintf("bytes total=%s used=%s available=%s", size(u.GetTotal()), size(u.GetUsed()), size(u.GetAvailable())))
		case csi.VolumeUsage_INODES:
			parts = append(parts, fmt.Sprintf("inodes total=%d used=%d", u.GetTotal(), u.GetUsed()))
		}
	}
	s.printf("< %s\n", strings.Join(parts, "; "))
	return used, nil
}

func (s *session) stepCleanUp(ctx context.Context) error {
	s.note("What kubelet and the external provisioner and snapshotter do when pods and claims go:")
	for _, id := range s.volumes {
		if err := s.unpublishUnstage(ctx, id, true); err != nil {
			return err
		}
	}
	for _, id := range slices.Clone(s.snapshots) {
		s.printf("> DeleteSnapshot snapshot_id=%s\n", id)
		if _, err := s.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			return fmt.Errorf("DeleteSnapshot %s: %w", id, err)
		}
		s.snapshots = slices.DeleteFunc(s.snapshots, func(x string) bool { return x == id })
		s.printf("< ok\n")
	}
	for _, id := range slices.Clone(s.volumes) {
		s.printf("> DeleteVolume volume_id=%s\n", id)
		if _, err := s.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			return fmt.Errorf("DeleteVolume %s: %w", id, err)
		}
		s.volumes = slices.DeleteFunc(s.volumes, func(x string) bool { return x == id })
		s.printf("< ok\n")
	}
	s.printf("> ListVolumes\n")
	lv, err := s.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		return fmt.Errorf("ListVolumes: %w", err)
	}
	s.printf("< %d entries\n", len(lv.GetEntries()))
	s.printf("> ListSnapshots\n")
	ls, err := s.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil {
		return fmt.Errorf("ListSnapshots: %w", err)
	}
	s.printf("< %d entries\n", len(ls.GetEntries()))
	if len(lv.GetEntries())+len(ls.GetEntries()) != 0 {
		return fmt.Errorf("%d volumes and %d snapshots left", len(lv.GetEntries()), len(ls.GetEntries()))
	}

	s.printf("$ kill -TERM %d\n", s.driver.Pid())
	if err := s.stopDriver(time.Minute); err != nil {
		return err
	}
	s.note("ploop-csi stopped cleanly.")

	s.note("No image, snapshot or record is left in the storage root (what remains are its empty directories and locks):")
	if _, err := s.sh(ctx, "cd $W/disk/root && find . -type f | sort"); err != nil {
		return err
	}
	for _, dir := range []string{"catalog/volumes", "catalog/snapshots", "ploop/volumes", "ploop/snapshots",
		"simfs/volumes", "simfs/snapshots", "nodes/" + nodeID + "/volumes"} {
		ents, err := os.ReadDir(filepath.Join(s.root, dir))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if len(ents) != 0 {
			return fmt.Errorf("%s is not empty after the clean-up: %d entries", dir, len(ents))
		}
	}
	s.note("simfs's registry of project quotas lists no volume or snapshot:")
	reg, err := s.sh(ctx, "cat $W/disk/root/simfs/.simfs/registry.json")
	if err != nil {
		return err
	}
	var r struct{ Volumes, Snapshots map[string]json.RawMessage }
	if err := json.Unmarshal([]byte(reg), &r); err != nil {
		return fmt.Errorf("simfs registry: %w", err)
	}
	if len(r.Volumes)+len(r.Snapshots) != 0 {
		return fmt.Errorf("simfs registry still lists %d volumes and %d snapshots", len(r.Volumes), len(r.Snapshots))
	}
	s.note("No mount is left under $W but the storage root's own:")
	if _, err := s.sh(ctx, `findmnt -rn -o TARGET,SOURCE | grep "^$W/"`); err != nil {
		return err
	}
	if left := s.mountsBelow(); len(left) != 1 || left[0] != filepath.Join(s.work, "disk") {
		return fmt.Errorf("mounts left under the work directory: %q", left)
	}
	conn := s.connectedNBD()
	if len(conn) > 0 {
		return fmt.Errorf("nbd devices still connected: %v", conn)
	}
	s.note("No nbd device is connected (no /sys/block/nbd*/pid).")
	s.note("Remove the storage root:")
	return s.removeRoot()
}

// unpublishUnstage takes volume id off the node, printing the calls when
// show is set.
func (s *session) unpublishUnstage(ctx context.Context, id string, show bool) error {
	if target, ok := s.published[id]; ok {
		if show {
			s.printf("> NodeUnpublishVolume volume_id=%s target_path=%s\n", id, s.short(target))
		}
		if _, err := s.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			return fmt.Errorf("NodeUnpublishVolume %s: %w", id, err)
		}
		delete(s.published, id)
		if show {
			s.printf("< ok\n")
		}
	}
	if staging, ok := s.staged[id]; ok {
		if show {
			s.printf("> NodeUnstageVolume volume_id=%s staging_target_path=%s\n", id, s.short(staging))
			if strings.HasPrefix(id, "ploop-") {
				s.note("unmount, flush, disconnect the nbd device, close the image")
			}
		}
		if _, err := s.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			return fmt.Errorf("NodeUnstageVolume %s: %w", id, err)
		}
		delete(s.staged, id)
		if show {
			s.printf("< ok\n")
		}
	}
	return nil
}

// stopDriver sends SIGTERM and waits for a clean exit; after wait it kills
// the driver.
func (s *session) stopDriver(wait time.Duration) error {
	if s.driver == nil {
		return nil
	}
	d := s.driver
	s.driver = nil
	return d.Stop(wait)
}

// mountsBelow lists the mount points under the work directory.
func (s *session) mountsBelow() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		// mountinfo escapes blanks as octal; the work directory has none.
		if mp := fields[4]; strings.HasPrefix(mp, s.work+"/") {
			out = append(out, mp)
		}
	}
	return out
}

// connectedNBD lists the nbd devices connected now that were not before
// the demo (/sys/block/nbdN/pid exists while a device is connected).
func (s *session) connectedNBD() []string {
	pids, _ := filepath.Glob("/sys/block/nbd*/pid")
	var out []string
	for _, p := range pids {
		if dev := filepath.Base(filepath.Dir(p)); !s.nbdPre[dev] {
			out = append(out, dev)
		}
	}
	return out
}

// removeRoot unmounts the storage root; its loop device goes with it
// (mount -o loop made it autoclear).
func (s *session) removeRoot() error {
	if !s.mounted {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := s.sh(ctx, "umount $W/disk"); err != nil {
		return err
	}
	s.mounted = false
	return nil
}

// undo removes, after a failure, what the demo made, as far as it can:
// through the driver first, then by unmounting what is left.
func (s *session) undo(ctx context.Context) {
	if s.driver != nil {
		for _, id := range slices.Clone(s.volumes) {
			s.note("unpublish and unstage %s: %v", id, errOK(s.unpublishUnstage(ctx, id, false)))
		}
		for _, id := range s.snapshots {
			_, err := s.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
			s.note("DeleteSnapshot %s: %v", id, errOK(err))
		}
		for _, id := range s.volumes {
			_, err := s.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			s.note("DeleteVolume %s: %v", id, errOK(err))
		}
	}
	if err := s.stopDriver(time.Minute); err != nil {
		s.note("%v", err)
	}
	// Deepest first; lazily, so that a mount on a dead nbd device goes too.
	left := s.mountsBelow()
	sort.Sort(sort.Reverse(sort.StringSlice(left)))
	for _, mp := range left {
		if mp == filepath.Join(s.work, "disk") {
			continue
		}
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
			s.note("unmount %s: %v", mp, err)
		}
	}
	if conn := s.connectedNBD(); len(conn) > 0 {
		s.note("nbd devices left connected: %v", conn)
	}
}

// errOK shows a nil error as ok.
func errOK(err error) any {
	if err == nil {
		return "ok"
	}
	return err
}

// showDriverLog prints the end of the driver's log file, if it has one.
func (s *session) showDriverLog() {
	if s.driverLog == "" {
		return
	}
	b, err := os.ReadFile(s.driverLog)
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	s.printf("\nThe last lines of ploop-csi's log:\n")
	for _, l := range lines {
		s.printf("  %s\n", l)
	}
}

// size shows a byte count in MiB when it is whole.
func size(b int64) string {
	if b != 0 && b%(1<<20) == 0 {
		return fmt.Sprintf("%dMiB", b>>20)
	}
	if b > 1<<20 {
		return fmt.Sprintf("%d(%.1fMiB)", b, float64(b)/(1<<20))
	}
	return fmt.Sprint(b)
}

func params(p map[string]string) string {
	var kv []string
	for k, v := range p {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return "{" + strings.Join(kv, ",") + "}"
}

func topology(seg map[string]string) string {
	return strings.TrimSuffix(strings.TrimPrefix(params(seg), "{"), "}")
}
