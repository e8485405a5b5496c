package main

import (
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runFlatten(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("flatten", "DIR",
		"Copies every cluster the top delta of DIR reads from lower (possibly shared) deltas into the top,\n"+
			"so the stack stands alone. The stack's snapshots are removed with their deltas.", stderr)
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one DIR")
	}
	if err := ploop.Flatten(pos[0]); err != nil {
		return failf(stderr, "flatten", err)
	}
	return exitOK
}
