package catalog

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// setInUse sets the in-use mark of an image, as a server killed while it
// had the image open leaves it.
func setInUse(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], 0x746F6E59)
	if _, err := f.WriteAt(b[:], 44); err != nil {
		t.Fatal(err)
	}
}

func topDelta(t *testing.T, dir string) string {
	t.Helper()
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	ch := d.Chain()
	return filepath.Join(dir, ch[len(ch)-1].File)
}

// TestCondition: a volume whose top delta a dead server left marked in use,
// or whose chain lost a delta, is abnormal with a message that says what to
// do; the in-use mark is repaired by the next offline operation.
func TestCondition(t *testing.T) {
	on := newStackOnline()
	c, _ := newCatalog(t, Options{Online: on})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 4 * mib})
	dir := c.stackDir(v.ID)
	writeVolume(t, dir, 0, pattern(1, int(mib)))
	if cond, err := c.Condition(ctx, v.ID); err != nil || cond.Abnormal {
		t.Fatalf("healthy: %+v, %v", cond, err)
	}
	// Attached, the top carries the mark of the live server: normal.
	on.attach(t, c, v.ID)
	if info, err := ploop.Inspect(topDelta(t, dir)); err != nil || !info.InUse {
		t.Fatalf("served top: %+v, %v", info, err)
	}
	if cond, err := c.Condition(ctx, v.ID); err != nil || cond.Abnormal {
		t.Fatalf("attached: %+v, %v", cond, err)
	}
	on.detach(t, v.ID)
	// The same mark with nobody serving: a server died.
	setInUse(t, topDelta(t, dir))
	cond, err := c.Condition(ctx, v.ID)
	if err != nil || !cond.Abnormal || !strings.Contains(cond.Message, "not closed cleanly") || !strings.Contains(cond.Message, "check --repair") {
		t.Fatalf("in-use top: %+v, %v", cond, err)
	}
	t.Logf("message: %s", cond.Message)
}

// TestConditionRepairsOffline: a snapshot of a volume left marked in use by
// a dead server repairs the stack first, as the node does on re-attach.
func TestConditionRepairsOffline(t *testing.T) {
	c, _ := newCatalog(t, Options{})
	ctx := testCtx(t)
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 4 * mib})
	dir := c.stackDir(v.ID)
	writeVolume(t, dir, 0, pattern(1, int(mib)))
	want := readVolume(t, dir)
	setInUse(t, topDelta(t, dir))
	if cond, _ := c.Condition(ctx, v.ID); !cond.Abnormal {
		t.Fatal("in-use top reported healthy")
	}
	s := mustSnapshot(t, c, "s", v.ID)
	if cond, err := c.Condition(ctx, v.ID); err != nil || cond.Abnormal {
		t.Fatalf("after the repairing snapshot: %+v, %v", cond, err)
	}
	equalData(t, "volume", readVolume(t, dir), want)
	equalData(t, "snapshot", readVolume(t, c.snapDir(s.ID)), want)
	qemuCheckStack(t, dir)

	// A lost delta.
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		t.Fatal(err)
	}
	lost := filepath.Join(dir, d.Chain()[0].File)
	if err := os.Remove(lost); err != nil {
		t.Fatal(err)
	}
	cond, err := c.Condition(ctx, v.ID)
	if err != nil || !cond.Abnormal || !strings.Contains(cond.Message, "missing") {
		t.Fatalf("lost delta: %+v, %v", cond, err)
	}
	// The snapshot has its own link and is unaffected.
	equalData(t, "snapshot after the volume lost a delta", readVolume(t, c.snapDir(s.ID)), want)
	if err := os.Remove(filepath.Join(dir, ploop.DescriptorName)); err != nil {
		t.Fatal(err)
	}
	if cond, _ := c.Condition(ctx, v.ID); !cond.Abnormal || !strings.Contains(cond.Message, "cannot be read") {
		t.Fatalf("lost descriptor: %+v", cond)
	}
	if _, err := c.Condition(ctx, NewVolumeID(Ploop)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown volume: %v", err)
	}

	// simfs: a root that stopped enforcing quota.
	c2, _ := newCatalog(t, fakeDirsOptions())
	sv := mustCreate(t, c2, VolumeRequest{Name: "s", Type: Simfs, RequiredBytes: mib})
	if cond, err := c2.Condition(ctx, sv.ID); err != nil || cond.Abnormal {
		t.Fatalf("simfs healthy: %+v, %v", cond, err)
	}
	dd, _ := c2.dirs()
	dd.(*diskDirs).notEnforced = errors.New("quota off")
	if cond, _ := c2.Condition(ctx, sv.ID); !cond.Abnormal || !strings.Contains(cond.Message, "quota") {
		t.Fatalf("simfs without quota: %+v", cond)
	}
}
