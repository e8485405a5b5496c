package main

import (
	"bytes"
	"encoding/json"
	"github.com/ploop-csi/ploop-csi/internal/testcmd"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

// writeDir writes p at off into the stack in dir.
func writeDir(t *testing.T, dir string, p []byte, off int64) {
	t.Helper()
	s, err := ploop.OpenStack(dir, ploop.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// exportRaw exports the stack (or snapshot guid) with convert and returns
// the raw bytes; a ploop export is also read back through qemu-img.
func exportRaw(t *testing.T, dir, guid string) []byte {
	t.Helper()
	tmp := t.TempDir()
	args := []string{"convert"}
	if guid != "" {
		args = append(args, "-u", guid)
	}
	mustPloopctl(t, append(args, dir, filepath.Join(tmp, "out.raw"))...)
	raw, err := os.ReadFile(filepath.Join(tmp, "out.raw"))
	if err != nil {
		t.Fatal(err)
	}
	mustPloopctl(t, append(args, "-O", "ploop", dir, filepath.Join(tmp, "out.hds"))...)
	qemuImg(t, "check", "-f", "parallels", filepath.Join(tmp, "out.hds"))
	qemuImg(t, "convert", "-f", "parallels", "-O", "raw", filepath.Join(tmp, "out.hds"), filepath.Join(tmp, "q.raw"))
	q, err := os.ReadFile(filepath.Join(tmp, "q.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(q, raw) {
		t.Fatalf("the raw and the ploop export of %s differ", dir)
	}
	return raw
}

func TestStackVerbs(t *testing.T) {
	testcmd.Need(t, "qemu-img")
	for _, rawBase := range []bool{false, true} {
		t.Run(map[bool]string{false: "ploop-base", true: "raw-base"}[rawBase], func(t *testing.T) {
			root := t.TempDir()
			dir := filepath.Join(root, "vol")
			args := []string{"init", "-s", "3M", "--cluster-size", "64K", dir}
			if rawBase {
				args = append(args, "--raw-base")
			}
			mustPloopctl(t, args...)
			rng := rand.New(rand.NewPCG(5, 6))
			model := make([]byte, 3<<20)
			put := func(off int64, n int) {
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(rng.IntN(255) + 1)
				}
				writeDir(t, dir, p, off)
				copy(model[off:], p)
			}
			put(0, 200<<10)
			put(1<<20+5, 70<<10)
			state1 := bytes.Clone(model)
			g1 := strings.TrimSpace(mustPloopctl(t, "snapshot", dir))
			if !ploop.ValidGUID(g1) {
				t.Fatalf("snapshot printed %q", g1)
			}
			put(100<<10, 10)
			put(2<<20, 300<<10)
			state2 := bytes.Clone(model)
			g2 := strings.TrimSpace(mustPloopctl(t, "snapshot", dir))
			put(5, 5)

			var list []ploop.SnapshotInfo
			if err := json.Unmarshal([]byte(mustPloopctl(t, "snapshot-list", "--json", dir)), &list); err != nil {
				t.Fatal(err)
			}
			if len(list) != 3 || list[0].GUID != g1 || list[1].GUID != g2 || !list[2].Top || list[2].GUID != ploop.TopGUID {
				t.Fatalf("snapshot-list: %+v", list)
			}
			if out := mustPloopctl(t, "snapshot-list", dir); !strings.Contains(out, g2) || !strings.Contains(out, "* "+ploop.TopGUID) {
				t.Fatalf("snapshot-list:\n%s", out)
			}
			if got := exportRaw(t, dir, ""); !bytes.Equal(got, model) {
				t.Fatal("convert DIR differs from the model")
			}
			if got := exportRaw(t, dir, g1); !bytes.Equal(got, state1) {
				t.Fatal("convert -u g1 differs from the model")
			}

			clone := filepath.Join(root, "clone")
			mustPloopctl(t, "clone", "-u", g2, dir, clone)
			writeDir(t, clone, []byte("clone"), 0)
			cloneModel := bytes.Clone(state2)
			copy(cloneModel, "clone")

			mustPloopctl(t, "snapshot-delete", "-u", g1, dir)
			if got := exportRaw(t, dir, ""); !bytes.Equal(got, model) {
				t.Fatal("volume changed by snapshot-delete")
			}
			if got := exportRaw(t, dir, g2); !bytes.Equal(got, state2) {
				t.Fatal("snapshot g2 changed by deleting g1")
			}
			if _, stderr, code := ploopctl(t, "convert", "-u", g1, dir, filepath.Join(root, "x")); code != exitFail || !strings.Contains(stderr, "no snapshot") {
				t.Fatalf("export of a deleted snapshot: %d %s", code, stderr)
			}
			mustPloopctl(t, "flatten", clone)
			if got := exportRaw(t, clone, ""); !bytes.Equal(got, cloneModel) {
				t.Fatal("flatten changed the clone")
			}
			if err := os.RemoveAll(dir); err != nil {
				t.Fatal(err)
			}
			if got := exportRaw(t, clone, ""); !bytes.Equal(got, cloneModel) {
				t.Fatal("clone broken by removing its source")
			}
			if out := mustPloopctl(t, "check", clone); !strings.Contains(out, "consistent") {
				t.Fatalf("check:\n%s", out)
			}
			if out := mustPloopctl(t, "info", clone); !strings.Contains(out, "deltas:             1") {
				t.Fatalf("info:\n%s", out)
			}
			mustPloopctl(t, "grow", "-s", "5M", clone)
			cloneModel = append(cloneModel, make([]byte, 2<<20)...)
			writeDir(t, clone, []byte("end"), 5<<20-3)
			copy(cloneModel[5<<20-3:], "end")
			if got := exportRaw(t, clone, ""); !bytes.Equal(got, cloneModel) {
				t.Fatal("grown clone differs from the model")
			}
			var m []ploop.StackMapping
			if err := json.Unmarshal([]byte(mustPloopctl(t, "map", "--json", clone)), &m); err != nil || len(m) == 0 || m[0].Offset != 0 {
				t.Fatalf("map: %v %+v", err, m)
			}
		})
	}
}

func TestStackVerbErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"init", dir}, exitUsage, "-s SIZE is required"},
		{[]string{"init", "-s", "1M", "--cluster-size", "3K", dir}, exitUsage, "cluster-size"},
		{[]string{"snapshot"}, exitUsage, "need exactly one DIR"},
		{[]string{"snapshot", dir}, exitFail, "ploopctl snapshot:"},
		{[]string{"snapshot-delete", dir}, exitUsage, "-u needs a GUID"},
		{[]string{"snapshot-delete", "-u", ploop.TopGUID, dir}, exitFail, "ploopctl snapshot-delete:"},
		{[]string{"clone", "-u", ploop.TopGUID, dir}, exitUsage, "need SRCDIR and DSTDIR"},
		{[]string{"flatten", dir}, exitFail, "ploopctl flatten:"},
		{[]string{"snapshot-list", dir}, exitFail, "ploopctl snapshot-list:"},
		{[]string{"snapshot", "--help"}, exitOK, "usage: ploopctl snapshot DIR"},
		{[]string{"grow", dir}, exitUsage, "-s SIZE is required"},
		{[]string{"grow", "-s", "1G", dir}, exitFail, "ploopctl grow:"},
	}
	for _, tc := range tests {
		_, stderr, code := ploopctl(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.msg) {
			t.Errorf("ploopctl %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.msg)
		}
	}
	mustPloopctl(t, "init", "-s", "1M", dir)
	if _, stderr, code := ploopctl(t, "init", "-s", "1M", dir); code != exitFail || !strings.Contains(stderr, "not empty") {
		t.Errorf("init of an existing stack: %d %s", code, stderr)
	}
	if _, stderr, code := ploopctl(t, "snapshot-delete", "-u", ploop.TopGUID, dir); code != exitFail || !strings.Contains(stderr, "top delta") {
		t.Errorf("deleting the top: %d %s", code, stderr)
	}
	// Past the BAT area of one cluster: the data clusters in the way move.
	if _, stderr, code := ploopctl(t, "grow", "-s", "1T", dir); code != exitOK {
		t.Errorf("grow past the BAT area: %d %s", code, stderr)
	}
	os.WriteFile(filepath.Join(dir, "root.hds.orphan"), []byte("x"), 0o600)
	if out, _, code := ploopctl(t, "check", dir); code != exitFail || !strings.Contains(out, "orphan") {
		t.Errorf("check with an orphan: %d\n%s", code, out)
	}
	if out, _, code := ploopctl(t, "check", "--repair", dir); code != exitOK || !strings.Contains(out, "FIXED orphan") {
		t.Errorf("check --repair: %d\n%s", code, out)
	}
}
