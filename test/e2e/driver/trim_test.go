package drivere2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"golang.org/x/sys/unix"
)

// testTrim: 512 MiB written to a file on a published ext4 volume and
// deleted come back to the storage root by the driver's periodic trim
// (--trim-interval 2s): the image's allocated bytes drop by at least 95%
// of the bytes written.
func testTrim(t *testing.T) {
	const written = 512 * mib
	e := newEnv(t, 1280, "--trim-interval", "2s")
	v := e.create("trimmed", 768*mib, mountCap("ext4"), nil)
	// ext4's lazy inode table initialisation would write the inode tables
	// (12 MiB of zeros here, allocated in the image) in the background
	// during the measurement, and that space is rightly not given back:
	// the mount flag keeps it out, so that only the write and its trim
	// move the numbers.
	c := mountCap("ext4")
	c.GetMount().MountFlags = []string{"noinit_itable"}
	v = e.withCap(v, c)
	e.up(v)
	dir := e.stackDir(v)
	base := allocated(t, dir)

	big := filepath.Join(v.target, "big")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	chunk := record(7, int(mib))
	start := time.Now()
	for range written / mib {
		if _, err := f.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	wrote := time.Since(start)
	full := allocated(t, dir)
	if full-base < written*9/10 {
		t.Fatalf("%d MiB written, but the image grew by %d MiB only", written>>20, (full-base)>>20)
	}
	if err := os.Remove(big); err != nil {
		t.Fatal(err)
	}
	g, err := os.Open(v.target)
	if err != nil {
		t.Fatal(err)
	}
	err = unix.Syncfs(int(g.Fd()))
	g.Close()
	if err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	// The driver logs each volume's trim when it is done: the second one
	// logged from now on belongs to a pass that began after the delete
	// was committed.
	trimmed := func() int { return strings.Count(e.d.Log(), `"trim" logger="attachments" volume="`+v.id+`"`) }
	passes := trimmed()
	testcmd.WaitFor(t, 3*time.Minute, "a periodic trim pass that began after the delete", func() (bool, error) {
		return trimmed() >= passes+2, nil
	})
	now := allocated(t, dir)
	t.Logf("trim: %d MiB written in %v; image allocated %d MiB -> %d MiB -> %d MiB: %.1f%% of the written bytes back %v after the delete",
		written>>20, wrote.Round(time.Millisecond), base>>20, full>>20, now>>20, 100*float64(full-now)/float64(written),
		time.Since(deleted).Round(time.Millisecond))
	if float64(full-now) < 0.95*float64(written) {
		t.Fatalf("the periodic trim gave back %d of the %d MiB written and deleted, less than 95%%", (full-now)>>20, written>>20)
	}
	e.down(v)
	wantClean(t, dir)
	e.deleteVolume(v)
	e.finish()
}
