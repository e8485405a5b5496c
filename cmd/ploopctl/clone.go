package main

import (
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runClone(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("clone", "-u GUID SRCDIR DSTDIR",
		"Creates the stack DSTDIR from snapshot GUID of SRCDIR: the snapshot's deltas are shared\n"+
			"read-only by hard link (same filesystem), a new empty top takes the writes. Removing SRCDIR,\n"+
			"the snapshot or other clones later never breaks the clone. DSTDIR must not exist.", stderr)
	guid := fs.String("u", "", "`GUID` of the snapshot to clone")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 2 {
		return usageError(fs, stderr, "need SRCDIR and DSTDIR")
	}
	if !ploop.ValidGUID(*guid) {
		return usageError(fs, stderr, "-u needs a GUID like {5fbaabe3-6958-40ff-92a7-860e329aab41}")
	}
	if err := ploop.Clone(pos[0], *guid, pos[1]); err != nil {
		return failf(stderr, "clone", err)
	}
	return exitOK
}
