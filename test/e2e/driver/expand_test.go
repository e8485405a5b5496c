package drivere2e

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/ploop-csi/ploop-csi/internal/testcmd"
)

// testOnlineExpand: ext4, xfs and Block volumes grow while published and
// in use (a file, or the device, held open with data on it):
// ControllerExpandVolume grows the stack and asks for the node step,
// NodeExpandVolume on the target grows the device and the filesystem. df
// (or blockdev --getsize64 for Block) shows the new size, the new space
// takes data, and the data written before reads back unchanged.
func testOnlineExpand(t *testing.T) {
	e := newEnv(t, 1024)
	for _, tc := range []struct {
		name     string
		c        *csi.VolumeCapability
		from, to int64
	}{
		{"ext4", mountCap("ext4"), 64 * mib, 192 * mib},
		// mkfs.xfs makes nothing below 300 MiB.
		{"xfs", mountCap("xfs"), 320 * mib, 512 * mib},
		{"block", blockCap(), 64 * mib, 192 * mib},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := e.create("expand-"+tc.name, tc.from, tc.c, nil)
			e.up(v)
			data := record(1, int(8*mib))
			var f *os.File
			var err error
			if v.block() {
				f, err = os.OpenFile(v.target, os.O_RDWR, 0)
			} else {
				f, err = os.OpenFile(filepath.Join(v.target, "data"), os.O_RDWR|os.O_CREATE, 0o644)
			}
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			before := e.size(t, v)

			cr := &csi.CapacityRange{RequiredBytes: tc.to}
			ce, err := e.d.Controller.ControllerExpandVolume(e.ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.id, CapacityRange: cr, VolumeCapability: v.cap})
			if err != nil || ce.GetCapacityBytes() != tc.to || !ce.GetNodeExpansionRequired() {
				t.Fatalf("ControllerExpandVolume: %v %v", ce, err)
			}
			ne, err := e.d.Node.NodeExpandVolume(e.ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: v.target,
				StagingTargetPath: v.staging, CapacityRange: cr, VolumeCapability: v.cap})
			if err != nil || ne.GetCapacityBytes() != tc.to {
				t.Fatalf("NodeExpandVolume: %v %v", ne, err)
			}
			after := e.size(t, v)
			st, c := e.stats(v)
			t.Logf("%s: %d MiB -> %d MiB requested; %s %d -> %d bytes; NodeGetVolumeStats total %d; condition %q",
				tc.name, tc.from>>20, tc.to>>20, map[bool]string{true: "blockdev --getsize64", false: "df size"}[v.block()],
				before, after, st.GetUsage()[0].GetTotal(), c.Message)
			if c.Abnormal {
				t.Fatalf("abnormal after the expansion: %s", c.Message)
			}
			if v.block() {
				if before != tc.from || after != tc.to {
					t.Fatalf("device size %d -> %d, want %d -> %d", before, after, tc.from, tc.to)
				}
			} else if grew := after - before; grew < (tc.to-tc.from)*9/10 || after > tc.to {
				t.Fatalf("filesystem size %d -> %d for a device grown by %d", before, after, tc.to-tc.from)
			}
			if st.GetUsage()[0].GetTotal() != after {
				t.Errorf("NodeGetVolumeStats total %d, df/blockdev %d", st.GetUsage()[0].GetTotal(), after)
			}
			// The new space takes data: for Block, the last 8 MiB of the
			// device; for ext4, more than the filesystem had before in all
			// (xfs, five times larger, only gets 16 MiB: its df size is
			// the proof, writing 340 MiB under emulation is not worth it).
			more := record(2, int(8*mib))
			if v.block() {
				if _, err := f.WriteAt(more, tc.to-int64(len(more))); err != nil {
					t.Fatal(err)
				}
			} else {
				n := 16 * mib / int64(len(more))
				if tc.name == "ext4" {
					n = (tc.from + 16*mib) / int64(len(more))
				}
				g, err := os.Create(filepath.Join(v.target, "more"))
				if err != nil {
					t.Fatal(err)
				}
				for i := range n {
					if _, err := g.WriteAt(more, i*int64(len(more))); err != nil {
						t.Fatalf("writing past the old size: %v", err)
					}
				}
				if err := g.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			dropCaches(t)
			got := make([]byte, len(data))
			if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("the data written before the expansion: %v, equal %t", err, bytes.Equal(got, data))
			}
			if v.block() {
				if _, err := f.ReadAt(got, tc.to-int64(len(more))); err != nil || !bytes.Equal(got, more) {
					t.Fatalf("the data in the new space: %v", err)
				}
			}
			f.Close()
			e.down(v)
			wantClean(t, e.stackDir(v))
			if !v.block() && tc.name == "ext4" {
				e.fsckBlock(v)
			}
			e.deleteVolume(v)
		})
	}
	e.finish()
}

// size is what df shows as the size of v's filesystem, or what blockdev
// --getsize64 shows for a Block volume's device.
func (e *env) size(t *testing.T, v *vol) int64 {
	t.Helper()
	var out string
	if v.block() {
		out = testcmd.Run(t, "blockdev", "--getsize64", v.target)
	} else {
		out = testcmd.Run(t, "df", "-B1", "--output=size", v.target)
		if l := strings.Fields(out); len(l) == 2 {
			out = l[1]
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil {
		t.Fatalf("size of %s: %q: %v", v.target, out, err)
	}
	return n
}
