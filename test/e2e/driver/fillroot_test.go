package drivere2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/test/e2e/csidriver"
)

// testFillRoot: a thin ext4 volume larger than what is left of its
// storage root (a filler file outside the root takes the rest of the
// root's filesystem) is written until writes fail. NodeGetVolumeStats
// then reports the volume abnormal with a message that names the cause.
// Once the filler is removed, the volume is unpublished, unstaged and
// staged again (stage runs fsck -a): the files fsynced before the failure
// read back, new writes succeed, and e2fsck -fn finds the filesystem
// clean.
func testFillRoot(t *testing.T) {
	const fileSize = 1 << 20
	// 512 MiB promised on a 256 MiB root.
	e := newEnv(t, 256, "--overcommit-ratio", "4")
	v := e.create("filled", 512*mib, mountCap("ext4"), nil)
	e.up(v)

	_, avail := statfs(t, e.mnt)
	filler := filepath.Join(e.mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, avail-48*mib); err != nil {
		t.Fatal(err)
	}
	f.Close()
	_, left := statfs(t, e.mnt)
	t.Logf("the filler leaves %d MiB of the root's filesystem free; the volume has %d MiB", left>>20, v.size>>20)

	// Write 1 MiB files, each fsynced, until one fails.
	var synced int
	var werr error
	for i := 0; i < int(v.size/fileSize); i++ {
		if werr = writeFile(filepath.Join(v.target, fmt.Sprintf("f%04d", i)), record(int64(i), fileSize)); werr != nil {
			break
		}
		synced++
	}
	if werr == nil {
		t.Fatalf("%d MiB written to a volume on a root with %d MiB free, and no write failed", synced, left>>20)
	}
	if !isIOErr(werr) {
		t.Errorf("the failed write: %v, want an I/O or no-space error", werr)
	}
	st, c := e.stats(v)
	_, rootFree := statfs(t, e.mnt)
	t.Logf("%d files of 1 MiB fsynced, then: %v; the root's filesystem has %d KiB free; NodeGetVolumeStats: abnormal %t, %q (used %d of %d bytes)",
		synced, werr, rootFree>>10, c.Abnormal, c.Message, st.GetUsage()[0].GetUsed(), st.GetUsage()[0].GetTotal())
	if !c.Abnormal || !strings.Contains(c.Message, "storage root") || !strings.Contains(c.Message, "full") {
		t.Errorf("the volume's condition says %q (abnormal %t), want it to say the storage root is full", c.Message, c.Abnormal)
	}
	g, err := e.d.Controller.ControllerGetVolume(e.ctx, &csi.ControllerGetVolumeRequest{VolumeId: v.id})
	if err != nil {
		t.Fatalf("ControllerGetVolume: %v", err)
	}
	cc, _, _ := csidriver.Condition(g.GetStatus())
	t.Logf("ControllerGetVolume condition: abnormal %t, %q", cc.Abnormal, cc.Message)

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	e.down(v)
	wantClean(t, e.stackDir(v))
	// What the failed writes left, before the stage's fsck -a repairs it.
	out, code := e.fsckStatus(v)
	t.Logf("e2fsck -fn after the unstage: exit status %d: %s", code, lastLine(out))
	e.up(v)
	for _, l := range strings.Split(e.d.Log(), "\n") {
		if strings.Contains(l, "fsck") {
			t.Logf("ploop-csi: %s", l)
		}
	}
	dropCaches(t)
	for i := range synced {
		got, err := os.ReadFile(filepath.Join(v.target, fmt.Sprintf("f%04d", i)))
		if err != nil || !bytes.Equal(got, record(int64(i), fileSize)) {
			t.Fatalf("file %d of the %d fsynced before the root filled up: %d bytes, %v", i, synced, len(got), err)
		}
	}
	if err := writeFile(filepath.Join(v.target, "after"), record(-1, 8<<20)); err != nil {
		t.Fatalf("writing after the space came back: %v", err)
	}
	if _, c := e.stats(v); c.Abnormal {
		t.Errorf("after the space came back and the volume was staged again: abnormal, %q", c.Message)
	}
	e.down(v)
	t.Logf("staged again after the space came back; e2fsck -fn: %s", lastLine(e.fsckBlock(v)))
	e.deleteVolume(v)
	e.finish()
}

// writeFile writes data to a new file and fsyncs it.
func writeFile(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
