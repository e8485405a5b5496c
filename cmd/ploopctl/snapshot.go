package main

import (
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runSnapshot(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("snapshot", "DIR",
		"Freezes the current state of the stack in DIR (which must not be in use) as a snapshot and\n"+
			"prints its GUID. Costs O(1): the top delta becomes read-only, a new empty top starts.", stderr)
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one DIR")
	}
	guid, err := ploop.Snapshot(pos[0])
	if err != nil {
		return failf(stderr, "snapshot", err)
	}
	fmt.Fprintln(stdout, guid)
	return exitOK
}
