package catalog

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

// dirVolumes is what the catalogue uses of a simfs.Root. It is an interface
// so that the host unit tests, which have no project quota, can check the
// catalogue's own logic for simfs volumes (records, idempotency, crash
// recovery, capacity) against a stand-in; the VM test uses the real Root.
type dirVolumes interface {
	QuotaEnforced() error
	VolumePath(id string) (string, error)
	Create(id string, bytes, inodes uint64) (simfs.Volume, error)
	Restore(id string, bytes, inodes uint64, source string) (simfs.Volume, error)
	Expand(id string, bytes, inodes uint64) (simfs.Volume, error)
	Get(id string) (simfs.Volume, error)
	Usage(id string) (simfs.Usage, error)
	Delete(id string) error
	Snapshot(id, source string) (simfs.Snapshot, error)
	GetSnapshot(id string) (simfs.Snapshot, error)
	DeleteSnapshot(id string) error
	Close() error
}

var _ dirVolumes = (*simfs.Root)(nil)

// simfsPath is the simfs root of the storage root dir.
func simfsPath(dir string) string { return filepath.Join(dir, simfsDir) }

// OpenSimfs opens the simfs root in which the catalogue of the storage root
// dir keeps simfs volumes, creating it: for a process that shares it between
// the catalogue (Options.SimfsRoot) and the node's attachments. The caller
// closes it after both.
func OpenSimfs(dir string, opts simfs.Options) (*simfs.Root, error) {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir {
		return nil, fmt.Errorf("open the simfs root of %q: the path must be absolute and clean: %w", dir, ErrInvalid)
	}
	if err := checkRoot(dir); err != nil {
		return nil, fmt.Errorf("open the simfs root: %w", err)
	}
	r, err := openSimfs(simfsPath(dir), opts)
	if err != nil {
		return nil, fmt.Errorf("open the simfs root: %w", classify(err))
	}
	return r, nil
}

// openSimfs opens (creating) root/simfs as a simfs root.
func openSimfs(dir string, opts simfs.Options) (*simfs.Root, error) {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, err
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	return simfs.Open(dir, opts)
}

// dirs returns the simfs root, opening it on first use. A root that does
// not enforce project quota still opens (existing volumes stay deletable);
// creating volumes then fails with ErrPrecondition.
func (c *Catalog) dirs() (dirVolumes, error) {
	c.simfsMu.Lock()
	defer c.simfsMu.Unlock()
	if c.simfs != nil {
		return c.simfs, nil
	}
	if c.opts.SimfsRoot != nil {
		c.simfs = c.opts.SimfsRoot
		return c.simfs, nil
	}
	open := c.opts.openDirs
	if open == nil {
		open = func(dir string) (dirVolumes, error) {
			r, err := openSimfs(dir, c.opts.Simfs)
			if err != nil {
				return nil, err // not a nil *simfs.Root in a non-nil interface
			}
			return r, nil
		}
	}
	d, err := open(simfsPath(c.root))
	if err != nil {
		return nil, fmt.Errorf("open the simfs root: %w", classify(err))
	}
	c.simfs = d
	return d, nil
}

// needQuota refuses simfs volumes on a root without enforced project quota:
// they would have no size limit.
func needQuota(d dirVolumes) error {
	if err := d.QuotaEnforced(); err != nil {
		return fmt.Errorf("simfs volumes need project quota enforced on the storage root's filesystem "+
			"(ext4: mkfs -O quota,project and mount -o prjquota; xfs: mount -o prjquota): %w: %w", ErrPrecondition, err)
	}
	return nil
}

// classify adds this package's error class to errors of the layers below,
// keeping the original for errors.Is.
func classify(err error) error {
	if err == nil {
		return nil
	}
	for _, ours := range []error{ErrInvalid, ErrNotFound, ErrExists, ErrOutOfRange, ErrNoSpace, ErrLimit,
		ErrInUse, ErrPrecondition, ErrBusy, ErrBadToken, ErrUnavailable} {
		if errors.Is(err, ours) {
			return err
		}
	}
	var class error
	switch {
	case errors.Is(err, simfs.ErrInvalid):
		class = ErrInvalid
	case errors.Is(err, simfs.ErrNotFound):
		class = ErrNotFound
	case errors.Is(err, simfs.ErrExists):
		class = ErrExists
	case errors.Is(err, simfs.ErrConflict):
		class = ErrOutOfRange
	case errors.Is(err, simfs.ErrQuotaNotEnforced):
		class = ErrPrecondition
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		class = ErrNoSpace
	case errors.Is(err, ploop.ErrChainFull):
		class = ErrLimit
	case errors.Is(err, ploop.ErrInUse), errors.Is(err, ploop.ErrCorrupt):
		class = ErrPrecondition
	case errors.Is(err, unix.EWOULDBLOCK):
		// A stack directory locked by a process that is not our Online.
		class = ErrInUse
	default:
		return err
	}
	return fmt.Errorf("%w: %w", class, err)
}
