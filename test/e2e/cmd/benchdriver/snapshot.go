package main

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// snapVolume is one volume of the snapshot measurement.
type snapVolume struct {
	mib     int64
	vol     *volume
	prev    string          // the previous sample's snapshot, deleted after the next write
	lat     []time.Duration // CreateSnapshot, per sample
	del     []time.Duration // DeleteSnapshot of the previous snapshot
	writeMB []float64       // MiB/s of each write
}

// benchSnapshot times CreateSnapshot of attached Block volumes, one per
// size. Before every sample the whole volume is written (direct I/O), so
// each snapshot freezes a top delta holding that much freshly written
// data. The previous sample's snapshot is deleted after that write and
// before the next snapshot: its delta is then fully overwritten, so the
// merge that drops it copies nothing, and the root holds at most twice
// the volume. The sizes are interleaved sample by sample.
func (b *bench) benchSnapshot(ctx context.Context) (string, error) {
	var vols []*snapVolume
	for _, mib := range b.cfg.snapMiB {
		v, err := b.createVolume(ctx, fmt.Sprintf("bench-snap-%dm", mib), mib<<20, "")
		if err != nil {
			return "", err
		}
		if err := b.stage(ctx, v, true); err != nil {
			return "", err
		}
		vols = append(vols, &snapVolume{mib: mib, vol: v})
	}
	for i := 0; i < b.cfg.snapSamples; i++ {
		for _, sv := range vols {
			r, err := runFio(ctx, sv.vol.target, "write", "1M", 4, 0, 0, 0)
			if err != nil {
				return "", err
			}
			sv.writeMB = append(sv.writeMB, r.MiBs)
			if sv.prev != "" {
				t0 := time.Now()
				if _, err := b.driver.Controller.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sv.prev}); err != nil {
					return "", fmt.Errorf("DeleteSnapshot %s: %w", sv.prev, err)
				}
				sv.del = append(sv.del, time.Since(t0))
				sv.prev = ""
				// The merged delta's space goes back to the tmpfs under
				// the scratch file system, which could not hold another.
				if err := b.trimRoot(ctx); err != nil {
					return "", err
				}
			}
			name := fmt.Sprintf("%s-%d", sv.vol.name, i+1)
			t0 := time.Now()
			resp, err := b.driver.Controller.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: sv.vol.id})
			d := time.Since(t0)
			if err != nil {
				return "", fmt.Errorf("CreateSnapshot %s: %w", name, err)
			}
			if !resp.GetSnapshot().GetReadyToUse() {
				return "", fmt.Errorf("CreateSnapshot %s: not ready to use", name)
			}
			sv.prev = resp.GetSnapshot().GetSnapshotId()
			sv.lat = append(sv.lat, d)
			b.logf("snapshot: %5d MiB written at %6.1f MiB/s, CreateSnapshot took %v", sv.mib, r.MiBs, d.Round(time.Millisecond))
		}
	}
	pauses, err := b.snapshotPauses()
	if err != nil {
		return "", err
	}
	// The volume first: the last snapshot then goes without a merge.
	for _, sv := range vols {
		if err := b.deleteVolume(ctx, sv.vol); err != nil {
			return "", err
		}
		if _, err := b.driver.Controller.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sv.prev}); err != nil {
			return "", fmt.Errorf("DeleteSnapshot %s: %w", sv.prev, err)
		}
	}
	if err := b.trimRoot(ctx); err != nil {
		return "", err
	}

	t := table{
		title: fmt.Sprintf("CreateSnapshot through the CSI API, Block volume staged and published (online), "+
			"whole volume written (direct I/O) before each of %d samples", b.cfg.snapSamples),
		header: []string{"written", "median", "max", "min", "I/O pause median", "I/O pause max", "write MiB/s", "DeleteSnapshot median"},
	}
	for _, sv := range vols {
		p := pauses[sv.vol.id]
		t.rows = append(t.rows, []string{sizeLabel(sv.mib), ms(median(sv.lat)), ms(maxOf(sv.lat)), ms(minOf(sv.lat)),
			ms(median(p)), ms(maxOf(p)), num(medianFloat(sv.writeMB), 1), ms(median(sv.del))})
	}
	if len(vols) >= 2 {
		small, large := vols[0], vols[len(vols)-1]
		t.rows = append(t.rows, []string{sizeLabel(large.mib) + "/" + sizeLabel(small.mib),
			ratio(median(large.lat).Seconds(), median(small.lat).Seconds()),
			ratio(maxOf(large.lat).Seconds(), maxOf(small.lat).Seconds()),
			ratio(minOf(large.lat).Seconds(), minOf(small.lat).Seconds()),
			ratio(median(pauses[large.vol.id]).Seconds(), median(pauses[small.vol.id]).Seconds()),
			ratio(maxOf(pauses[large.vol.id]).Seconds(), maxOf(pauses[small.vol.id]).Seconds()), "", ""})
		t.notes = append(t.notes, "goal: the ratio about 1 (a snapshot is O(1) in the data written)")
	}
	t.notes = append(t.notes,
		"I/O pause: how long the volume's I/O stood still while the stack switched to a new top delta (the driver's log)",
		"DeleteSnapshot: of the previous sample's snapshot, after the rewrite (the merge copies nothing)")
	return t.String(), nil
}

// snapshotPauses reads, from the driver's log, the I/O pause of each
// online snapshot by volume id.
func (b *bench) snapshotPauses() (map[string][]time.Duration, error) {
	data, err := os.ReadFile(b.driverLog.Name())
	if err != nil {
		return nil, err
	}
	return parsePauses(data), nil
}

var onlineSnapshotLine = regexp.MustCompile(`"online snapshot" .*\bvolume="([^"]+)".*\bpause="([^"]+)"`)

// parsePauses finds the attachments' V(2) line of each online snapshot
// (`"online snapshot" ... volume="ID" ... pause="1.5ms" ...`) and returns
// the pauses by volume id, in the log's order. Lines it cannot read are
// left out: the table then says n/a.
func parsePauses(log []byte) map[string][]time.Duration {
	out := map[string][]time.Duration{}
	for _, l := range strings.Split(string(log), "\n") {
		m := onlineSnapshotLine.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		d, err := time.ParseDuration(m[2])
		if err != nil || d < 0 {
			continue
		}
		out[m[1]] = append(out[m[1]], d)
	}
	return out
}

func sizeLabel(mib int64) string {
	if mib >= 1024 && mib%1024 == 0 {
		return fmt.Sprintf("%d GiB", mib/1024)
	}
	return fmt.Sprintf("%d MiB", mib)
}
