package catalog

import (
	"fmt"
	"testing"
)

// BenchmarkCreateSnapshot measures a ploop snapshot (freeze + the
// snapshot's own stack + records) of volumes holding different amounts of
// data: it should not depend on the data. Run with -benchtime=5x; each
// iteration's snapshot is deleted (merged) outside the timer.
func BenchmarkCreateSnapshot(b *testing.B) {
	for _, written := range []int64{mib, 256 * mib} {
		b.Run(fmt.Sprintf("written=%dMiB", written>>20), func(b *testing.B) {
			c, _ := newCatalog(b, Options{})
			ctx := testCtx(b)
			v := mustCreate(b, c, VolumeRequest{Name: "v", RequiredBytes: 2 * written})
			buf := pattern(1, int(16*mib))
			for off := int64(0); off < written; off += int64(len(buf)) {
				writeVolume(b, c.stackDir(v.ID), off, buf[:min(int64(len(buf)), written-off)])
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				s, err := c.CreateSnapshot(ctx, fmt.Sprint("s", i), v.ID)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := c.DeleteSnapshot(ctx, s.ID); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
