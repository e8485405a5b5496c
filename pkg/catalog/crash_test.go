package catalog

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The crash test: a child process (this test binary re-executed) opens a
// prepared root and runs one operation, SIGKILLing itself at the operation's
// Nth step (every hook between steps). The parent reopens the root, which
// recovers, and checks that nothing is stranded (the root holds exactly
// what the records say), that the objects that existed before still read
// as they did, and that repeating the operation succeeds with the right
// result. N grows until the operation completes without reaching it.

const crashEnv = "CATALOG_CRASH_CHILD"

// crashOps are the operations under test.
var crashOps = []string{
	"create", "restore", "clone", "snapshot", "delete-snapshot", "delete-volume", "delete-clone-source", "expand",
	"simfs-create", "simfs-clone", "simfs-snapshot", "simfs-delete",
}

// crashFixture is what the parent prepares: ploop volume v (data b) with
// snapshot s (data a) and clone cl of v; simfs volume sv with snapshot ss.
type crashFixture struct {
	v, s, cl, sv, ss string
	a, b             []byte
}

func prepareCrash(t *testing.T, root string) crashFixture {
	t.Helper()
	c, err := Open(root, fakeDirsOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var f crashFixture
	v := mustCreate(t, c, VolumeRequest{Name: "v", RequiredBytes: 8 * mib, ClusterSize: 64 << 10})
	writeVolume(t, c.stackDir(v.ID), 0, pattern(1, int(2*mib)))
	f.a = readVolume(t, c.stackDir(v.ID))
	f.s = mustSnapshot(t, c, "s", v.ID).ID
	writeVolume(t, c.stackDir(v.ID), mib, pattern(2, int(2*mib)))
	f.b = readVolume(t, c.stackDir(v.ID))
	f.v = v.ID
	f.cl = mustCreate(t, c, VolumeRequest{Name: "cl", SourceVolume: v.ID}).ID
	sv := mustCreate(t, c, VolumeRequest{Name: "sv", Type: Simfs, RequiredBytes: mib})
	p, _ := c.VolumePath(sv.ID)
	if err := os.WriteFile(filepath.Join(p, "f"), []byte("simfs data"), 0o600); err != nil {
		t.Fatal(err)
	}
	f.sv = sv.ID
	f.ss = mustSnapshot(t, c, "ss", sv.ID).ID
	return f
}

// runCrashOp runs op against the fixture.
func runCrashOp(ctx context.Context, c *Catalog, op string, f crashFixture) error {
	var err error
	switch op {
	case "create":
		_, err = c.CreateVolume(ctx, VolumeRequest{Name: "new", RequiredBytes: 4 * mib})
	case "restore":
		_, err = c.CreateVolume(ctx, VolumeRequest{Name: "new", SourceSnapshot: f.s, RequiredBytes: 12 * mib})
	case "clone":
		_, err = c.CreateVolume(ctx, VolumeRequest{Name: "new", SourceVolume: f.v})
	case "snapshot":
		_, err = c.CreateSnapshot(ctx, "new", f.v)
	case "delete-snapshot":
		err = c.DeleteSnapshot(ctx, f.s)
	case "delete-volume":
		err = c.DeleteVolume(ctx, f.cl) // its deletion merges the delta v shared with it
	case "delete-clone-source":
		err = c.DeleteVolume(ctx, f.v)
	case "expand":
		_, _, err = c.ExpandVolume(ctx, f.v, 20*mib, 0)
	case "simfs-create":
		_, err = c.CreateVolume(ctx, VolumeRequest{Name: "new", Type: Simfs, RequiredBytes: mib})
	case "simfs-clone":
		_, err = c.CreateVolume(ctx, VolumeRequest{Name: "new", Type: Simfs, SourceVolume: f.sv})
	case "simfs-snapshot":
		_, err = c.CreateSnapshot(ctx, "new", f.sv)
	case "simfs-delete":
		if err = c.DeleteSnapshot(ctx, f.ss); err == nil {
			err = c.DeleteVolume(ctx, f.sv)
		}
	default:
		err = fmt.Errorf("unknown op %q", op)
	}
	return err
}

// TestCrashChild is the child side; it does nothing unless re-executed by
// TestCrashEveryStep.
func TestCrashChild(t *testing.T) {
	spec := os.Getenv(crashEnv)
	if spec == "" {
		return
	}
	fs := strings.Split(spec, ",")
	op, root := fs[0], fs[1]
	n, _ := strconv.Atoi(fs[2])
	f := crashFixture{v: fs[3], s: fs[4], cl: fs[5], sv: fs[6], ss: fs[7]}
	opts := fakeDirsOptions()
	count := 0
	opts.hook = func(point string) {
		count++
		if count == n {
			fmt.Fprintf(os.Stdout, "killed at %s\n", point)
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	}
	c, err := Open(root, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := runCrashOp(context.Background(), c, op, f); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(os.Stdout, "completed")
}

func TestCrashEveryStep(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range crashOps {
		t.Run(op, func(t *testing.T) {
			for n := 1; ; n++ {
				if n > 30 {
					t.Fatal("the operation never completes")
				}
				root := fastDir(t)
				f := prepareCrash(t, root)
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				cmd := exec.CommandContext(ctx, self, "-test.run=^TestCrashChild$", "-test.count=1")
				cmd.Env = append(os.Environ(), crashEnv+"="+strings.Join([]string{op, root, strconv.Itoa(n), f.v, f.s, f.cl, f.sv, f.ss}, ","))
				out, err := cmd.CombinedOutput()
				cancel()
				completed := bytes.Contains(out, []byte("completed"))
				killed := bytes.Contains(out, []byte("killed at"))
				if !completed && !killed {
					t.Fatalf("step %d: child: %v\n%s", n, err, out)
				}
				point := "completion"
				if i := bytes.Index(out, []byte("killed at ")); i >= 0 {
					point = firstLine(string(out[i+len("killed at "):]))
				}
				checkAfterCrash(t, op, root, f, fmt.Sprintf("%s killed at step %d (%s)", op, n, point))
				if completed {
					if n == 1 {
						t.Fatal("the operation has no steps")
					}
					t.Logf("%s: %d steps", op, n-1)
					return
				}
			}
		})
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// checkAfterCrash reopens the root, checks it, repeats the operation and
// checks the result.
func checkAfterCrash(t *testing.T, op, root string, f crashFixture, what string) {
	t.Helper()
	c, err := Open(root, fakeDirsOptions())
	if err != nil {
		t.Fatalf("%s: reopen: %v", what, err)
	}
	defer c.Close()
	ctx := testCtx(t)
	checkConsistent(t, c)
	checkFakeDirs(t, c, what)
	// What existed before reads as it did, unless this op deleted it.
	if _, err := c.GetVolume(ctx, f.v); err == nil {
		equalData(t, what+": v", readVolume(t, c.stackDir(f.v))[:len(f.b)], f.b)
	} else if op != "delete-clone-source" {
		t.Fatalf("%s: v is gone: %v", what, err)
	}
	if _, err := c.GetVolume(ctx, f.cl); err == nil {
		equalData(t, what+": cl", readVolume(t, c.stackDir(f.cl)), f.b)
	} else if op != "delete-volume" {
		t.Fatalf("%s: cl is gone: %v", what, err)
	}
	if _, err := c.GetSnapshot(ctx, f.s); err == nil {
		equalData(t, what+": s", readVolume(t, c.snapDir(f.s)), f.a)
	} else if op != "delete-snapshot" {
		t.Fatalf("%s: s is gone: %v", what, err)
	}
	if err := c.Tidy(ctx); err != nil {
		t.Fatalf("%s: tidy: %v", what, err)
	}
	if err := runCrashOp(ctx, c, op, f); err != nil {
		t.Fatalf("%s: repeat: %v", what, err)
	}
	checkConsistent(t, c)
	checkFakeDirs(t, c, what)
	newVol := func() Volume {
		for _, v := range mustList(t, c) {
			if v.Name == "new" {
				return v
			}
		}
		t.Fatalf("%s: no volume \"new\"", what)
		return Volume{}
	}
	switch op {
	case "create":
		if v := newVol(); !bytes.Equal(readVolume(t, c.stackDir(v.ID)), make([]byte, 4*mib)) {
			t.Fatalf("%s: new volume not blank", what)
		}
	case "restore":
		got := readVolume(t, c.stackDir(newVol().ID))
		equalData(t, what+": restored", got[:len(f.a)], f.a)
		equalData(t, what+": restored tail", got[len(f.a):], make([]byte, 4*mib))
	case "clone":
		equalData(t, what+": clone", readVolume(t, c.stackDir(newVol().ID)), f.b)
	case "snapshot":
		l, _, _ := c.ListSnapshots(ctx, SnapshotFilter{SourceVolume: f.v}, "", 0)
		var id string
		for _, s := range l {
			if s.Name == "new" {
				id = s.ID
			}
		}
		equalData(t, what+": new snapshot", readVolume(t, c.snapDir(id)), f.b)
		// The chain holds s's delta, the clone's, the new one and the top.
		if d := depth(t, c.stackDir(f.v)); d != 4 {
			t.Fatalf("%s: v depth %d", what, d)
		}
	case "delete-snapshot":
		if d := depth(t, c.stackDir(f.v)); d != 2 {
			t.Fatalf("%s: v depth %d after the snapshot's merge", what, d)
		}
	case "delete-volume":
		if d := depth(t, c.stackDir(f.v)); d != 2 {
			t.Fatalf("%s: v depth %d after the clone's delta was merged", what, d)
		}
	case "delete-clone-source":
		equalData(t, what+": clone of the deleted source", readVolume(t, c.stackDir(f.cl)), f.b)
	case "expand":
		got := readVolume(t, c.stackDir(f.v))
		if v, _ := c.GetVolume(ctx, f.v); v.Size != 20*mib || int64(len(got)) != 20*mib {
			t.Fatalf("%s: size %d, stack %d", what, v.Size, len(got))
		}
	case "simfs-clone":
		p, _ := c.VolumePath(newVol().ID)
		if b, err := os.ReadFile(filepath.Join(p, "f")); err != nil || string(b) != "simfs data" {
			t.Fatalf("%s: simfs clone: %q %v", what, b, err)
		}
	}
}

func mustList(t *testing.T, c *Catalog) []Volume {
	t.Helper()
	l, _, err := c.ListVolumes(testCtx(t), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// checkFakeDirs: the simfs stand-in holds exactly the recorded simfs
// volumes and snapshots (each a directory and a meta file).
func checkFakeDirs(t *testing.T, c *Catalog, what string) {
	t.Helper()
	d, err := c.dirs()
	if err != nil {
		t.Fatal(err)
	}
	var wantV, wantS []string
	c.mu.Lock()
	for id, r := range c.vols {
		if r.Type == Simfs {
			wantV = append(wantV, id, id+".meta")
		}
	}
	for id, r := range c.snaps {
		if r.Type == Simfs {
			wantS = append(wantS, id, id+".meta")
		}
	}
	c.mu.Unlock()
	slices.Sort(wantV)
	slices.Sort(wantS)
	if got := d.(*diskDirs).names("volumes"); !slices.Equal(got, wantV) {
		t.Fatalf("%s: simfs volumes %v, records %v", what, got, wantV)
	}
	if got := d.(*diskDirs).names("snapshots"); !slices.Equal(got, wantS) {
		t.Fatalf("%s: simfs snapshots %v, records %v", what, got, wantS)
	}
}
