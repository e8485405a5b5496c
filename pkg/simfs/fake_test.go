package simfs

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// fakeQuota stands in for the kernel on hosts without project quota. It keeps
// project IDs by inode and limits in memory; it tests the logic above the
// kernel (allocation, registry, idempotency), never quota enforcement itself.
// Roots sharing one fakeQuota model roots on one filesystem.
type fakeQuota struct {
	// fsRoot stands in for the filesystem's root directory, where the
	// allocation lock lives; openFake sets it.
	fsRoot    string
	mu        sync.Mutex
	notEnfErr error
	projects  map[[2]uint64]uint32 // (dev, ino) → project
	limits    map[uint32][2]uint64
	foreign   map[uint32]bool // IDs "in use" elsewhere on the filesystem
	calls     int             // mutating calls, to prove bad input touches nothing
}

func newFakeQuota() *fakeQuota {
	return &fakeQuota{projects: map[[2]uint64]uint32{}, limits: map[uint32][2]uint64{}, foreign: map[uint32]bool{}}
}

func (f *fakeQuota) enforced() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.notEnfErr != nil {
		return fmt.Errorf("fake: %w: %w", ErrQuotaNotEnforced, f.notEnfErr)
	}
	return nil
}

func fdKey(fd int) ([2]uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return [2]uint64{}, err
	}
	return [2]uint64{st.Dev, st.Ino}, nil
}

func (f *fakeQuota) setProject(fd int, p uint32) error {
	k, err := fdKey(fd)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.projects[k] = p
	return nil
}

func (f *fakeQuota) project(fd int) (uint32, error) {
	k, err := fdKey(fd)
	if err != nil {
		return 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.projects[k], nil
}

func (f *fakeQuota) setLimits(p uint32, bytes, inodes uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if bytes == 0 && inodes == 0 {
		delete(f.limits, p)
	} else {
		f.limits[p] = [2]uint64{bytes, inodes}
	}
	return nil
}

func (f *fakeQuota) usage(p uint32) (quotaUsage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.limits[p]
	return quotaUsage{BytesLimit: l[0], InodesLimit: l[1]}, nil
}

func (f *fakeQuota) usedProjects() (map[uint32]bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	used := map[uint32]bool{}
	for p := range f.limits {
		used[p] = true
	}
	for p := range f.foreign {
		used[p] = true
	}
	return used, nil
}
