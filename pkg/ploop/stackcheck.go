package ploop

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// StackReport is the result of CheckStack or RepairStack.
type StackReport struct {
	Dir string `json:"dir"`
	// Deltas holds the report of each Compressed delta, base first.
	Deltas []*Report `json:"deltas"`
	// Orphans are delta files and temporary files in the directory that
	// the descriptor does not reference (left by an interrupted
	// operation); RepairStack removes them.
	Orphans []string `json:"orphans"`
	// Unfinished lists operations found half done (a grow whose top
	// delta is smaller than the descriptor); RepairStack finishes them.
	Unfinished []string `json:"unfinished"`
	Repaired   bool     `json:"repaired"`
}

// checkSize checks a delta's virtual size against the descriptor: a lower
// delta may be smaller (it was frozen before a grow), the top must match.
// A top smaller than the descriptor is a grow interrupted after the
// descriptor switch; repair finishes it.
func (r *StackReport) checkSize(dir string, im DescriptorImg, isTop bool, have, want int64, repair bool) error {
	switch {
	case have > want:
		return fmt.Errorf("check stack %s: delta %s is %d bytes, larger than the descriptor's %d: %w", dir, im.File, have, want, ErrCorrupt)
	case have == want || !isTop:
		return nil
	case !repair:
		r.Unfinished = append(r.Unfinished, fmt.Sprintf("top delta %s is %d bytes, the descriptor says %d (interrupted grow)", im.File, have, want))
		return nil
	}
	if err := growTop(dir, im, want); err != nil {
		return fmt.Errorf("repair %s: finish the grow: %w", dir, err)
	}
	r.Unfinished = append(r.Unfinished, fmt.Sprintf("top delta %s grown from %d to the descriptor's %d bytes (interrupted grow)", im.File, have, want))
	r.Repaired = true
	return nil
}

// Clean reports whether every delta is clean and no orphan is left.
func (r *StackReport) Clean() bool {
	for _, d := range r.Deltas {
		if !d.Clean() {
			return false
		}
	}
	return (len(r.Orphans) == 0 && len(r.Unfinished) == 0) || r.Repaired
}

// String is the report for a person.
func (r *StackReport) String() string {
	var b strings.Builder
	for _, d := range r.Deltas {
		b.WriteString(d.String())
	}
	for _, o := range r.Orphans {
		state := "ERROR"
		if r.Repaired {
			state = "FIXED"
		}
		fmt.Fprintf(&b, "%s orphan: %s is not referenced by %s\n", state, o, DescriptorName)
	}
	for _, u := range r.Unfinished {
		state := "ERROR"
		if r.Repaired {
			state = "FIXED"
		}
		fmt.Fprintf(&b, "%s unfinished: %s\n", state, u)
	}
	if r.Clean() {
		fmt.Fprintf(&b, "%s: the stack is consistent.\n", r.Dir)
	}
	return b.String()
}

// CheckStack checks the descriptor, every delta and the directory for
// leftovers, without changing anything.
func CheckStack(dir string) (*StackReport, error) { return checkStack(dir, false) }

// RepairStack brings a stack left by a crash back to a consistent state:
// each delta is repaired (see Repair) and files left by an interrupted
// snapshot, merge or descriptor write are removed. The descriptor decides
// which state the stack is in, so the result is the state before or after
// the interrupted operation. The directory must not be in use.
func RepairStack(dir string) (*StackReport, error) { return checkStack(dir, true) }

func checkStack(dir string, repair bool) (*StackReport, error) {
	rep := &StackReport{Dir: dir}
	if repair {
		unlock, err := lockDir(dir)
		if err != nil {
			return nil, fmt.Errorf("repair %s: %w", dir, err)
		}
		defer unlock()
	}
	d, err := ReadDescriptor(dir)
	if err != nil {
		return nil, fmt.Errorf("check stack: %w", err)
	}
	chain := d.Chain()
	referenced := map[string]bool{}
	for i, im := range chain {
		referenced[im.File] = true
		path := filepath.Join(dir, im.File)
		isTop := i == len(chain)-1
		if im.Type == TypePlain {
			st, err := os.Stat(path)
			if err != nil {
				return rep, fmt.Errorf("check stack %s: %w", dir, err)
			}
			if err := rep.checkSize(dir, im, isTop, st.Size(), d.Size(), repair); err != nil {
				return rep, err
			}
			continue
		}
		var r *Report
		if repair {
			r, err = Check(path)
			if err == nil && len(r.Problems) != 0 {
				r, err = Repair(path)
			}
		} else {
			r, err = Check(path)
		}
		if err != nil {
			if r != nil {
				rep.Deltas = append(rep.Deltas, r)
			}
			return rep, fmt.Errorf("check stack %s: %w", dir, err)
		}
		rep.Deltas = append(rep.Deltas, r)
		if r.ClusterSize != d.ClusterSize() {
			return rep, fmt.Errorf("check stack %s: delta %s has cluster size %d, the descriptor says %d: %w",
				dir, im.File, r.ClusterSize, d.ClusterSize(), ErrCorrupt)
		}
		if err := rep.checkSize(dir, im, isTop, r.VirtualSize, d.Size(), repair); err != nil {
			return rep, err
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return rep, fmt.Errorf("check stack: %w", err)
	}
	for _, e := range ents {
		n := e.Name()
		ours := n == DescriptorName+".tmp" || n == baseFile || strings.HasPrefix(n, baseFile+".")
		if ours && e.Type().IsRegular() && !referenced[n] {
			rep.Orphans = append(rep.Orphans, n)
		}
	}
	if repair && len(rep.Orphans) != 0 {
		for _, o := range rep.Orphans {
			if err := os.Remove(filepath.Join(dir, o)); err != nil && !os.IsNotExist(err) {
				return rep, fmt.Errorf("repair %s: %w", dir, err)
			}
		}
		if err := syncDir(dir); err != nil {
			return rep, fmt.Errorf("repair %s: %w", dir, err)
		}
		rep.Repaired = true
	}
	for _, r := range rep.Deltas {
		if r.Repaired {
			rep.Repaired = true
		}
	}
	return rep, nil
}
