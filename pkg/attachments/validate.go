package attachments

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/ploop-csi/ploop-csi/pkg/mounts"
)

// Limits on what a request may carry.
const (
	// MaxIDLength bounds volume ids (CSI ids are at most 128 bytes).
	MaxIDLength = 128
	// MaxPathLength bounds staging and target paths (PATH_MAX).
	MaxPathLength = 4096
	// maxOptions bounds mkfs and mount option lists.
	maxOptions = 64
	// maxOptionLength bounds one option.
	maxOptionLength = 1024
)

// ValidateVolumeID checks a volume id: 1..MaxIDLength characters from
// [A-Za-z0-9._-], not starting with '.' or '-', with no "..". Ids name the
// state files and the kernel's backend identifiers, so this is what keeps
// them inside the state directory.
func ValidateVolumeID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("volume id is empty: %w", ErrInvalid)
	case len(id) > MaxIDLength:
		return fmt.Errorf("volume id is %d bytes long, more than %d: %w", len(id), MaxIDLength, ErrInvalid)
	case id[0] == '.' || id[0] == '-':
		return fmt.Errorf("volume id %q starts with %q: %w", id, id[0], ErrInvalid)
	case strings.Contains(id, ".."):
		return fmt.Errorf("volume id %q contains \"..\": %w", id, ErrInvalid)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("volume id %q holds %q: %w", id, c, ErrInvalid)
		}
	}
	return nil
}

// checkAbs checks that p is an absolute, clean path other than "/".
func checkAbs(what, p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%s is empty: %w", what, ErrInvalid)
	case len(p) > MaxPathLength:
		return fmt.Errorf("%s is %d bytes long, more than %d: %w", what, len(p), MaxPathLength, ErrInvalid)
	case strings.ContainsAny(p, "\x00\n"):
		return fmt.Errorf("%s %q holds NUL or a line feed: %w", what, p, ErrInvalid)
	case !filepath.IsAbs(p):
		return fmt.Errorf("%s %q is not absolute: %w", what, p, ErrInvalid)
	case filepath.Clean(p) != p:
		return fmt.Errorf("%s %q is not clean (want %q): %w", what, p, filepath.Clean(p), ErrInvalid)
	case p == "/":
		return fmt.Errorf("%s is the root directory: %w", what, ErrInvalid)
	}
	return nil
}

// within reports whether p is base or below it; both are clean and absolute.
func within(p, base string) bool {
	if base == "/" {
		return true
	}
	return p == base || strings.HasPrefix(p, base+"/")
}

// checkOptions validates mkfs or mount options: bounded, and passable to
// the tools as they are.
func checkOptions(what string, opts []string) error {
	if len(opts) > maxOptions {
		return fmt.Errorf("%d %ss, more than %d: %w", len(opts), what, maxOptions, ErrInvalid)
	}
	for _, o := range opts {
		if len(o) > maxOptionLength {
			return fmt.Errorf("%s is %d bytes long, more than %d: %w", what, len(o), maxOptionLength, ErrInvalid)
		}
	}
	if err := mounts.CheckOptions(what, opts); err != nil {
		return fmt.Errorf("%v: %w", err, ErrInvalid)
	}
	return nil
}

// checkMountPath checks a staging or target path: absolute and clean,
// below one of the configured prefixes when there are any, and never in
// the storage root or the state directory (a mount there would cover
// volumes or records).
func (m *Manager) checkMountPath(what, p string) error {
	if err := checkAbs(what, p); err != nil {
		return err
	}
	for _, base := range []string{m.opts.StorageRoot, m.opts.StateDir} {
		if within(p, base) || within(base, p) {
			return fmt.Errorf("%s %s overlaps %s: %w", what, p, base, ErrInvalid)
		}
	}
	if len(m.opts.PathPrefixes) == 0 {
		return nil
	}
	for _, base := range m.opts.PathPrefixes {
		if within(p, base) && p != base {
			return nil
		}
	}
	return fmt.Errorf("%s %s is not below %s: %w", what, p, strings.Join(m.opts.PathPrefixes, " or "), ErrInvalid)
}

// checkVolumePath checks the directory of a volume: absolute, clean,
// strictly below the storage root, and reached through no symlink, so
// that whatever is opened there is inside the root.
func (m *Manager) checkVolumePath(p string) error {
	if err := checkAbs("volume path", p); err != nil {
		return err
	}
	if !within(p, m.opts.StorageRoot) || p == m.opts.StorageRoot {
		return fmt.Errorf("volume path %s is not below the storage root %s: %w", p, m.opts.StorageRoot, ErrInvalid)
	}
	if within(p, m.opts.StateDir) {
		return fmt.Errorf("volume path %s is in the state directory: %w", p, ErrInvalid)
	}
	return nil
}

// resolvesTo checks, once the path exists, that no symlink leads out of
// where it claims to be.
func resolvesTo(p string) error {
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return err
	}
	if real != p {
		return fmt.Errorf("%s resolves to %s: %w", p, real, ErrInvalid)
	}
	return nil
}
