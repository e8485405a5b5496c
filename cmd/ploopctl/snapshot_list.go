package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runSnapshotList(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("snapshot-list", "[--json] DIR",
		"Lists the deltas of the stack in DIR, base first; the last one (marked *) is the writable top,\n"+
			"the others are snapshots. LINKS is how many stack directories share the delta.", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one DIR")
	}
	list, err := ploop.ListSnapshots(pos[0])
	if err != nil {
		return failf(stderr, "snapshot-list", err)
	}
	if *asJSON {
		b, err := json.MarshalIndent(list, "", "  ")
		if err != nil {
			return failf(stderr, "snapshot-list", err)
		}
		fmt.Fprintf(stdout, "%s\n", b)
		return exitOK
	}
	fmt.Fprintf(stdout, "  %-38s %-38s %-10s %-5s %s\n", "GUID", "PARENT", "TYPE", "LINKS", "FILE")
	for _, s := range list {
		mark := " "
		if s.Top {
			mark = "*"
		}
		fmt.Fprintf(stdout, "%s %-38s %-38s %-10s %-5d %s\n", mark, s.GUID, s.ParentGUID, s.Type, s.Links, s.File)
	}
	return exitOK
}
