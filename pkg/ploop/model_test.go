package ploop

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// The reference-model test: random sequences of writes, discards,
// snapshots, snapshot deletions, clones, flattens, grows, compactions and volume removals run
// against stacks on disk and against an in-memory model of every volume's
// and snapshot's contents. After every step each volume and each snapshot
// read through OpenStack equals the model, our CheckStack finds every
// directory clean, and qemu-img check passes every delta that changed.

type modelVolume struct {
	dir   string
	data  []byte
	snaps map[string][]byte // snapshot GUID -> frozen contents
}

type stackModel struct {
	t       *testing.T
	rng     *rand.Rand
	root    string
	vols    map[string]*modelVolume
	nextVol int
	// checked remembers delta files qemu-img already passed, by inode,
	// size and modification time.
	checked map[string]bool
	log     []string
	// seq numbers snapshots in creation order, so that picking one does
	// not depend on the random GUIDs and a seed replays exactly.
	seq map[string]int
}

func (m *stackModel) names() []string {
	var ns []string
	for n := range m.vols {
		ns = append(ns, n)
	}
	slices.Sort(ns)
	return ns
}

func (m *stackModel) pick() *modelVolume {
	ns := m.names()
	return m.vols[ns[m.rng.IntN(len(ns))]]
}

func (m *stackModel) pickSnap(v *modelVolume) string {
	var gs []string
	for g := range v.snaps {
		gs = append(gs, g)
	}
	if len(gs) == 0 {
		return ""
	}
	slices.SortFunc(gs, func(a, b string) int { return m.seq[a] - m.seq[b] })
	return gs[m.rng.IntN(len(gs))]
}

func (m *stackModel) newVolume(raw bool) *modelVolume {
	name := fmt.Sprintf("vol%d", m.nextVol)
	m.nextVol++
	v := &modelVolume{dir: filepath.Join(m.root, name), data: make([]byte, stackSize), snaps: map[string][]byte{}}
	m.vols[name] = v
	return v
}

func (m *stackModel) step() {
	t, r := m.t, m.rng
	v := m.pick()
	switch op := r.IntN(23); {
	case op < 8:
		m.log = append(m.log, "write "+v.dir)
		writeStack(t, v.dir, func(s *Stack) {
			for range r.IntN(4) + 1 {
				size := int64(len(v.data))
				off := r.Int64N(size)
				n := min(r.Int64N(3*stackCluster)+1, size-off)
				var err error
				switch r.IntN(6) {
				case 0:
					err = s.Discard(off, n)
					clear(v.data[off : off+n])
				case 1:
					err = s.WriteZeroes(off, n, r.IntN(2) == 0)
					clear(v.data[off : off+n])
				default:
					p := randomBytes(r, int(n))
					_, err = s.WriteAt(p, off)
					copy(v.data[off:], p)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
		})
	case op < 11:
		if len(v.snaps) > 12 {
			return
		}
		g, err := Snapshot(v.dir)
		if err != nil {
			t.Fatal(err)
		}
		m.log = append(m.log, "snapshot "+v.dir+" "+g)
		v.snaps[g] = bytes.Clone(v.data)
		m.seq[g] = len(m.seq)
	case op < 14:
		g := m.pickSnap(v)
		if g == "" {
			return
		}
		m.log = append(m.log, "delete-snapshot "+v.dir+" "+g)
		if err := DeleteSnapshot(v.dir, g); err != nil {
			t.Fatal(err)
		}
		delete(v.snaps, g)
	case op < 17:
		g := m.pickSnap(v)
		if g == "" || len(m.vols) > 6 {
			return
		}
		c := m.newVolume(false)
		m.log = append(m.log, "clone "+v.dir+" "+g+" "+c.dir)
		if err := Clone(v.dir, g, c.dir); err != nil {
			t.Fatal(err)
		}
		c.data = bytes.Clone(v.snaps[g])
		// The clone inherits the snapshots at and below g.
		list, err := ListSnapshots(c.dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, si := range list[:len(list)-1] {
			if data, ok := v.snaps[si.GUID]; ok {
				c.snaps[si.GUID] = data
			} else {
				// A delta the source had but whose snapshot state is
				// no longer modelled: (cannot happen: every non-top
				// delta of a stack is a snapshot).
				t.Fatalf("clone inherited %s, unknown to the model", si.GUID)
			}
		}
	case op >= 21:
		m.log = append(m.log, "compact "+v.dir)
		if _, err := CompactStack(v.dir); err != nil {
			t.Fatal(err)
		}
	case op == 18:
		if len(v.data) > 6<<20 {
			return
		}
		size := int64(len(v.data)) + 512*(r.Int64N(1024)+1)
		m.log = append(m.log, fmt.Sprint("grow ", v.dir, " ", size))
		if err := GrowStack(v.dir, size); err != nil {
			t.Fatal(err)
		}
		v.data = append(v.data, make([]byte, size-int64(len(v.data)))...)
	case op < 18:
		m.log = append(m.log, "flatten "+v.dir)
		if err := Flatten(v.dir); err != nil {
			t.Fatal(err)
		}
		// The snapshots at and below the highest shared delta go.
		list, err := ListSnapshots(v.dir)
		if err != nil {
			t.Fatal(err)
		}
		kept := map[string][]byte{}
		for _, si := range list[:len(list)-1] {
			if si.Links != 1 {
				t.Fatalf("flattened %s still shares %s", v.dir, si.File)
			}
			kept[si.GUID] = v.snaps[si.GUID]
		}
		v.snaps = kept
	default:
		if len(m.vols) < 2 {
			return
		}
		m.log = append(m.log, "remove "+v.dir)
		if err := os.RemoveAll(v.dir); err != nil {
			t.Fatal(err)
		}
		delete(m.vols, filepath.Base(v.dir))
	}
}

func (m *stackModel) verify() {
	t := m.t
	for _, n := range m.names() {
		v := m.vols[n]
		if got := readStack(t, v.dir, ""); !bytes.Equal(got, v.data) {
			t.Fatalf("%s: %s\nlog:\n%s", v.dir, firstDiff(got, v.data), strings.Join(m.log, "\n"))
		}
		list, err := ListSnapshots(v.dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(list)-1 != len(v.snaps) {
			t.Fatalf("%s lists %d snapshots, the model has %d", v.dir, len(list)-1, len(v.snaps))
		}
		for g, want := range v.snaps {
			if got := readStack(t, v.dir, g); !bytes.Equal(got, want) {
				t.Fatalf("%s snapshot %s: %s\nlog:\n%s", v.dir, g, firstDiff(got, want), strings.Join(m.log, "\n"))
			}
		}
		rep, err := CheckStack(v.dir)
		if err != nil || !rep.Clean() {
			t.Fatalf("check %s: %v\n%v", v.dir, err, rep)
		}
		for _, si := range list {
			if si.Type != TypeCompressed {
				continue
			}
			p := filepath.Join(v.dir, si.File)
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			sys := st.Sys().(*syscall.Stat_t)
			key := fmt.Sprint(sys.Ino, st.Size(), st.ModTime().UnixNano())
			if !m.checked[key] {
				qemuCheck(t, p)
				m.checked[key] = true
			}
		}
	}
}

func TestStackModel(t *testing.T) {
	steps := 150
	if testing.Short() {
		steps = 40
	}
	seeds := uint64(5)
	if v := os.Getenv("PLOOP_MODEL_SEEDS"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("PLOOP_MODEL_SEEDS=%q: %v", v, err)
		}
		seeds = n
	}
	// PLOOP_MODEL_SEEDS and PLOOP_MODEL_SEED_BASE run other seeds.
	base := uint64(0)
	if v := os.Getenv("PLOOP_MODEL_SEED_BASE"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("PLOOP_MODEL_SEED_BASE=%q: %v", v, err)
		}
		base = n
	}
	for seed := base; seed < base+seeds; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			m := &stackModel{t: t, rng: rand.New(rand.NewPCG(seed, 77)), root: t.TempDir(),
				vols: map[string]*modelVolume{}, checked: map[string]bool{}, seq: map[string]int{}}
			raw := seed%2 == 1
			v := m.newVolume(raw)
			mustInit(t, v.dir, raw)
			for range steps {
				m.step()
				m.verify()
			}
			t.Logf("seed %d: %d steps, %d volumes at the end, %d qemu-img checks", seed, steps, len(m.vols), len(m.checked))
		})
	}
}
