package drivere2e

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// testSnapshotWhileWriting: CreateSnapshot of a published ext4 volume
// while a writer appends fsynced records to a file on it. The snapshot is
// restored into a new volume (CreateVolume from the snapshot); the file
// there is a whole prefix of the log holding every record acknowledged
// before CreateSnapshot was called and none whose write began after it
// returned, and its filesystem checks clean with e2fsck -fn: the snapshot
// is the state at one instant between the call and its return. The source
// keeps every record. With deleteSource the source volume is unstaged and
// deleted before the restore, and the snapshot still restores with the
// same content.
func testSnapshotWhileWriting(t *testing.T, deleteSource bool) {
	const recSize = 16 << 10
	e := newEnv(t, 1024)
	src := e.create("source", 256*mib, mountCap("ext4"), nil)
	e.up(src)
	w := startWriter(t, filepath.Join(src.target, "log"), recSize)
	w.waitAcked(t, e.ctx, 64)

	before := w.acked.Load()
	start := time.Now()
	r, err := e.d.Controller.CreateSnapshot(e.ctx, &csi.CreateSnapshotRequest{Name: "while-writing", SourceVolumeId: src.id})
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	took := time.Since(start)
	after := w.started.Load()
	sn := r.GetSnapshot()
	if !sn.GetReadyToUse() || sn.GetSourceVolumeId() != src.id || sn.GetSizeBytes() != src.size {
		t.Fatalf("CreateSnapshot: %v", sn)
	}
	// The writer goes on past the snapshot.
	w.waitAcked(t, e.ctx, after+64)
	acked := w.finish()
	started := w.started.Load() // final: the writer has stopped
	if errs := w.errors(); len(errs) > 0 {
		t.Fatalf("the writer saw errors: %v", errs)
	}
	t.Logf("CreateSnapshot took %v with the writer at %d acknowledged records when called and %d begun when it returned; %d records in all",
		took.Round(time.Millisecond), before, after, acked)
	verifyLog(t, filepath.Join(src.target, "log"), recSize, acked, started)

	if deleteSource {
		e.down(src)
		e.deleteVolume(src)
		if _, err := e.d.Controller.ControllerGetVolume(e.ctx, &csi.ControllerGetVolumeRequest{VolumeId: src.id}); err == nil {
			t.Fatalf("the deleted source volume is still there")
		}
		l, err := e.d.Controller.ListSnapshots(e.ctx, &csi.ListSnapshotsRequest{SnapshotId: sn.GetSnapshotId()})
		if err != nil || len(l.GetEntries()) != 1 {
			t.Fatalf("ListSnapshots after the source was deleted: %v %v", l, err)
		}
	}

	snapSrc := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sn.GetSnapshotId()}}}
	restored := e.create("restored", src.size, mountCap("ext4"), snapSrc)
	fsck := e.fsckBlock(restored)
	t.Logf("the restored filesystem checks clean: %s", lastLine(fsck))
	e.up(restored)
	dropCaches(t)
	k := verifyLog(t, filepath.Join(restored.target, "log"), recSize, before, after)
	t.Logf("restored volume: records 0..%d, within [%d, %d]", k-1, before, after)
	e.down(restored)
	e.deleteVolume(restored)

	if !deleteSource {
		// The source is still staged and in use: its data is intact.
		verifyLog(t, filepath.Join(src.target, "log"), recSize, acked, started)
		e.down(src)
		e.deleteVolume(src)
	}
	if _, err := e.d.Controller.DeleteSnapshot(e.ctx, &csi.DeleteSnapshotRequest{SnapshotId: sn.GetSnapshotId()}); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	e.finish()
}

func lastLine(s string) string {
	for len(s) > 0 && s[len(s)-1] == '\n' {
		s = s[:len(s)-1]
	}
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '\n' {
			return s[i+1:]
		}
	}
	return s
}
