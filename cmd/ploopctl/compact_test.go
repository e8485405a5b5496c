package main

import (
	"bytes"
	"encoding/json"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"os"
	"path/filepath"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// TestCompactVerb compacts a stack directory and a lone image after half
// of their data was discarded: the contents stay and the files shrink.
func TestCompactVerb(t *testing.T) {
	testcmd.Need(t, "qemu-img")
	root := t.TempDir()
	dir := filepath.Join(root, "vol")
	mustPloopctl(t, "init", "-s", "4M", "--cluster-size", "64K", dir)
	model := make([]byte, 4<<20)
	for i := range model {
		model[i] = byte(i*7 + 1)
	}
	writeDir(t, dir, model, 0)
	s, err := ploop.OpenStack(dir, ploop.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for c := int64(0); c < 64; c += 2 {
		if err := s.Discard(c<<16, 1<<16); err != nil {
			t.Fatal(err)
		}
		clear(model[c<<16 : (c+1)<<16])
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// A copy of the delta, compacted as a lone image.
	img := filepath.Join(root, "lone.hds")
	b, err := os.ReadFile(filepath.Join(dir, "root.hds"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, b, 0o600); err != nil {
		t.Fatal(err)
	}
	out := mustPloopctl(t, "compact", "--json", dir)
	var res ploop.CompactResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("compact --json: %v\n%s", err, out)
	}
	if res.FileSizeAfter != 1<<16+32<<16 || res.FileSizeBefore <= res.FileSizeAfter {
		t.Fatalf("compact result %+v", res)
	}
	if got := exportRaw(t, dir, ""); !bytes.Equal(got, model) {
		t.Fatal("the compacted stack reads differently")
	}
	mustPloopctl(t, "compact", img)
	qemuImg(t, "check", "-f", "parallels", img)
	if st, err := os.Stat(img); err != nil || st.Size() != 1<<16+32<<16 {
		t.Fatalf("compacted image: %v %v", st.Size(), err)
	}
	if _, _, code := ploopctl(t, "compact"); code != 2 {
		t.Fatalf("compact without DIR exited %d", code)
	}
}
