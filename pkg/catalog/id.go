package catalog

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"strings"
)

// Type is a volume's kind of storage.
type Type string

const (
	// Ploop volumes are ploop stacks served to the kernel as block devices.
	Ploop Type = "ploop"
	// Simfs volumes are directories limited by project quota.
	Simfs Type = "simfs"
)

// Id prefixes: the type is part of a volume id so that a node can tell how
// to stage it without asking the catalogue; snapshot ids have their own.
const (
	ploopPrefix    = "ploop-"
	simfsPrefix    = "simfs-"
	snapshotPrefix = "snap-"
	uuidLen        = 36
)

// MaxIDLength bounds every id and name this package accepts in a path
// component (CSI object names are at most 128 bytes too).
const MaxIDLength = 128

// newUUID returns a random (version 4) UUID in its canonical lower-case form.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		// crypto/rand does not fail on Linux (getrandom); a failure is not
		// something a request can recover from.
		panic(fmt.Sprintf("catalog: crypto/rand: %v", err))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	const hex = "0123456789abcdef"
	out := make([]byte, 0, uuidLen)
	for i, c := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out = append(out, '-')
		}
		out = append(out, hex[c>>4], hex[c&0xf])
	}
	return string(out)
}

// NewVolumeID returns a fresh volume id of type t.
func NewVolumeID(t Type) string {
	if t == Simfs {
		return simfsPrefix + newUUID()
	}
	return ploopPrefix + newUUID()
}

// NewSnapshotID returns a fresh snapshot id.
func NewSnapshotID() string { return snapshotPrefix + newUUID() }

// checkSafe rejects what must never reach a path: empty, too long, bytes
// other than [A-Za-z0-9._-], a leading '.' or '-', or "..". It is the same
// rule simfs applies to its ids.
func checkSafe(what, id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%s id is empty: %w", what, ErrInvalid)
	case len(id) > MaxIDLength:
		return fmt.Errorf("%s id is %d bytes long, more than %d: %w", what, len(id), MaxIDLength, ErrInvalid)
	case id[0] == '.' || id[0] == '-':
		return fmt.Errorf("%s id %q starts with %q: %w", what, id, id[0], ErrInvalid)
	case strings.Contains(id, ".."):
		return fmt.Errorf("%s id %q contains \"..\": %w", what, id, ErrInvalid)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return fmt.Errorf("%s id %q has byte %q at %d (allowed: A-Z a-z 0-9 . _ -): %w", what, id, c, i, ErrInvalid)
		}
	}
	return nil
}

// isUUID reports whether s is a canonical lower-case UUID.
func isUUID(s string) bool {
	if len(s) != uuidLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// ParseVolumeID checks a volume id before anything else looks at it and
// returns the volume's type. An id that could never reach a path safely
// ("../x", "/etc", NUL, 4 KiB) is ErrInvalid; a safe string that is not a
// volume id this package issues (a snapshot id, "reallyfakevolumeid") names
// no volume: ErrNotFound.
func ParseVolumeID(id string) (Type, error) {
	if err := checkSafe("volume", id); err != nil {
		return "", err
	}
	switch {
	case strings.HasPrefix(id, ploopPrefix) && isUUID(id[len(ploopPrefix):]):
		return Ploop, nil
	case strings.HasPrefix(id, simfsPrefix) && isUUID(id[len(simfsPrefix):]):
		return Simfs, nil
	}
	return "", fmt.Errorf("%q is not a volume id of this driver: %w", id, ErrNotFound)
}

// ValidateSnapshotID is ParseVolumeID for snapshot ids.
func ValidateSnapshotID(id string) error {
	if err := checkSafe("snapshot", id); err != nil {
		return err
	}
	if strings.HasPrefix(id, snapshotPrefix) && isUUID(id[len(snapshotPrefix):]) {
		return nil
	}
	return fmt.Errorf("%q is not a snapshot id of this driver: %w", id, ErrNotFound)
}

// List tokens are opaque to callers: the kind and the last id returned,
// base64url-encoded. Ids sort stably, so a page continues after the id in
// the token even when that object was deleted meanwhile.
const (
	volumeTokenKind   = "v1:volume:"
	snapshotTokenKind = "v1:snapshot:"
)

func makeToken(kind, lastID string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(kind + lastID))
}

// parseToken returns the id a token continues after ("" for no token).
func parseToken(kind, token string) (string, error) {
	if token == "" {
		return "", nil
	}
	if len(token) > 4*MaxIDLength {
		return "", fmt.Errorf("token is %d bytes long: %w", len(token), ErrBadToken)
	}
	b, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return "", fmt.Errorf("token %q: %w", token, ErrBadToken)
	}
	rest, ok := strings.CutPrefix(string(b), kind)
	if !ok {
		return "", fmt.Errorf("token %q was not issued for this list: %w", token, ErrBadToken)
	}
	switch kind {
	case volumeTokenKind:
		_, err = ParseVolumeID(rest)
	default:
		err = ValidateSnapshotID(rest)
	}
	if err != nil {
		return "", fmt.Errorf("token %q: %w", token, ErrBadToken)
	}
	return rest, nil
}
