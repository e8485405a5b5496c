package simfs

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// mountEntry is what project-ID locking needs from one line of
// /proc/self/mountinfo (proc_pid_mountinfo(5)).
type mountEntry struct {
	id  uint64 // mount ID, as statx(STATX_MNT_ID) reports it
	dev uint64 // st_dev of the mounted filesystem
	// root is the directory of the filesystem that appears at mountPoint:
	// "/" for a mount of the whole filesystem, a deeper path for a bind
	// mount of part of it. Pseudo filesystems use other forms ("net:[…]").
	root string
	// mountPoint is relative to the process's root directory.
	mountPoint string
}

// parseMountinfo decodes /proc/self/mountinfo. It rejects lines that do not
// have the kernel's shape rather than guess: a wrong reading could send the
// allocation lock to a directory other processes do not use.
func parseMountinfo(data []byte) ([]mountEntry, error) {
	var out []mountEntry
	for n, line := range bytes.Split(data, []byte{'\n'}) {
		if len(line) == 0 {
			continue
		}
		m, err := parseMountinfoLine(string(line))
		if err != nil {
			return nil, fmt.Errorf("mountinfo line %d: %w", n+1, err)
		}
		out = append(out, m)
	}
	return out, nil
}

// parseMountinfoLine reads "ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS
// [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS".
func parseMountinfoLine(line string) (mountEntry, error) {
	f := strings.Split(line, " ")
	if len(f) < 10 {
		return mountEntry{}, fmt.Errorf("%d fields, want at least 10", len(f))
	}
	sep := -1
	for i := 6; i < len(f); i++ {
		if f[i] == "-" {
			sep = i
			break
		}
	}
	if sep < 0 || len(f)-sep != 4 {
		return mountEntry{}, errors.New("no \"-\" separator followed by filesystem type, source and options")
	}
	var m mountEntry
	var err error
	if m.id, err = strconv.ParseUint(f[0], 10, 64); err != nil {
		return mountEntry{}, fmt.Errorf("mount ID: %w", err)
	}
	if _, err = strconv.ParseUint(f[1], 10, 64); err != nil {
		return mountEntry{}, fmt.Errorf("parent ID: %w", err)
	}
	maj, min, ok := strings.Cut(f[2], ":")
	if !ok {
		return mountEntry{}, fmt.Errorf("device %q is not MAJOR:MINOR", f[2])
	}
	ma, err := strconv.ParseUint(maj, 10, 32)
	if err != nil {
		return mountEntry{}, fmt.Errorf("device major: %w", err)
	}
	mi, err := strconv.ParseUint(min, 10, 32)
	if err != nil {
		return mountEntry{}, fmt.Errorf("device minor: %w", err)
	}
	m.dev = unix.Mkdev(uint32(ma), uint32(mi))
	if m.root, err = unescapeMountinfo(f[3]); err != nil {
		return mountEntry{}, fmt.Errorf("root: %w", err)
	}
	if m.mountPoint, err = unescapeMountinfo(f[4]); err != nil {
		return mountEntry{}, fmt.Errorf("mount point: %w", err)
	}
	if m.root == "" {
		return mountEntry{}, errors.New("empty root")
	}
	if !strings.HasPrefix(m.mountPoint, "/") {
		return mountEntry{}, fmt.Errorf("mount point %q is not absolute", m.mountPoint)
	}
	return m, nil
}

// unescapeMountinfo undoes the kernel's escaping of space, tab, newline and
// backslash as a backslash and three octal digits; any other backslash is
// malformed.
func unescapeMountinfo(s string) (string, error) {
	if !strings.Contains(s, `\`) {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			b.WriteByte(s[i])
			continue
		}
		if i+4 > len(s) {
			return "", fmt.Errorf("truncated escape in %q", s)
		}
		v, err := strconv.ParseUint(s[i+1:i+4], 8, 8)
		if err != nil {
			return "", fmt.Errorf("bad escape in %q", s)
		}
		b.WriteByte(byte(v))
		i += 3
	}
	return b.String(), nil
}
