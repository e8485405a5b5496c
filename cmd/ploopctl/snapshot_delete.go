package main

import (
	"errors"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
)

func runSnapshotDelete(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("snapshot-delete", "-u GUID DIR",
		"Deletes snapshot GUID of the stack in DIR by merging its delta into the delta above it.\n"+
			"If DIR is being served, the serving process merges while I/O continues and pauses it only to switch. Crash-safe: after an interruption, check --repair DIR leaves the stack\n"+
			"either with or without the snapshot, with the same contents.", stderr)
	guid := fs.String("u", "", "`GUID` of the snapshot to delete")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one DIR")
	}
	if !ploop.ValidGUID(*guid) {
		return usageError(fs, stderr, "-u needs a GUID like {5fbaabe3-6958-40ff-92a7-860e329aab41}")
	}
	_, err := callServed(pos[0], serving.Request{Op: serving.OpSnapshotDelete, GUID: *guid})
	if errors.Is(err, serving.ErrNotServed) {
		err = ploop.DeleteSnapshot(pos[0], *guid)
	}
	if err != nil {
		return failf(stderr, "snapshot-delete", err)
	}
	return exitOK
}
