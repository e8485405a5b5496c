package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
)

func runSnapshot(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("snapshot", "DIR",
		"Freezes the current state of the stack in DIR as a snapshot and prints its GUID. Costs O(1):\n"+
			"the top delta becomes read-only, a new empty top starts. If DIR is being served (ploopctl serve or\n"+
			"attach), the serving process takes the snapshot, pausing I/O only for the switch.", stderr)
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one DIR")
	}
	var guid string
	rep, err := callServed(pos[0], serving.Request{Op: serving.OpSnapshot})
	switch {
	case errors.Is(err, serving.ErrNotServed):
		guid, err = ploop.Snapshot(pos[0])
	case err == nil:
		guid = rep.GUID
	}
	if err != nil {
		return failf(stderr, "snapshot", err)
	}
	fmt.Fprintln(stdout, guid)
	return exitOK
}
