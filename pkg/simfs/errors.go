package simfs

import (
	"errors"
	"fmt"
	"strings"
)

// Error classes. Every error returned by this package that is caused by the
// caller or by the state of the root wraps exactly one of these.
var (
	// ErrInvalid: a malformed id or an unacceptable size (gRPC InvalidArgument).
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: no such volume or snapshot (gRPC NotFound).
	ErrNotFound = errors.New("not found")
	// ErrExists: the id is taken by an object with different parameters
	// (gRPC AlreadyExists).
	ErrExists = errors.New("already exists with different parameters")
	// ErrConflict: the request contradicts the current state, e.g. shrinking a
	// volume or restoring a snapshot into a volume too small for it
	// (gRPC FailedPrecondition / OutOfRange).
	ErrConflict = errors.New("conflict with current state")
	// ErrQuotaNotEnforced: the root's filesystem does not enforce project quota,
	// so a volume would have no size limit (gRPC FailedPrecondition).
	ErrQuotaNotEnforced = errors.New("project quota not enforced")
)

// Limits on identifiers and sizes.
const (
	// MaxIDLength bounds volume and snapshot ids (CSI names are at most 128).
	MaxIDLength = 128
	// MaxBytes bounds a volume's byte limit (1 PiB): larger requests are
	// treated as mistakes rather than overcommitted.
	MaxBytes = uint64(1) << 50
	// MaxInodes bounds a volume's inode limit.
	MaxInodes = uint64(1) << 32
	// BlockSize is the granularity of byte limits: limits are rounded up
	// to it (the quota's unit), so a caller that records sizes rounds to it
	// too.
	BlockSize = 4096
)

// ValidateID checks a volume or snapshot id: 1..MaxIDLength characters from
// [A-Za-z0-9._-], not starting with '.' or '-', and containing no "..".
// Ids become directory names, so this is what keeps them inside the root.
func ValidateID(id string) error {
	if id == "" {
		return fmt.Errorf("id is empty: %w", ErrInvalid)
	}
	if len(id) > MaxIDLength {
		return fmt.Errorf("id is %d bytes long, more than %d: %w", len(id), MaxIDLength, ErrInvalid)
	}
	if id[0] == '.' || id[0] == '-' {
		return fmt.Errorf("id %q starts with %q: %w", id, id[0], ErrInvalid)
	}
	if strings.Contains(id, "..") {
		return fmt.Errorf("id %q contains \"..\": %w", id, ErrInvalid)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return fmt.Errorf("id %q has character %q at %d (allowed: A-Z a-z 0-9 . _ -): %w", id, c, i, ErrInvalid)
		}
	}
	return nil
}

// validateLimits checks a byte and inode limit and returns the byte limit
// rounded up to whole blocks.
func validateLimits(bytes, inodes uint64) (uint64, error) {
	if bytes == 0 {
		return 0, fmt.Errorf("size 0: %w", ErrInvalid)
	}
	if bytes > MaxBytes {
		return 0, fmt.Errorf("size %d exceeds the maximum %d: %w", bytes, MaxBytes, ErrInvalid)
	}
	if inodes == 0 {
		return 0, fmt.Errorf("inode limit 0: %w", ErrInvalid)
	}
	if inodes > MaxInodes {
		return 0, fmt.Errorf("inode limit %d exceeds the maximum %d: %w", inodes, MaxInodes, ErrInvalid)
	}
	return (bytes + BlockSize - 1) / BlockSize * BlockSize, nil
}

// DefaultInodes is an inode limit for callers that only know a byte size
// (CSI requests carry none): one inode per 16 KiB, at least 4096.
func DefaultInodes(bytes uint64) uint64 {
	n := bytes / (16 << 10)
	if n < 4096 {
		n = 4096
	}
	if n > MaxInodes {
		n = MaxInodes
	}
	return n
}
