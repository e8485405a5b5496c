package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
)

func runCompact(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("compact", "[--json] DIR|IMAGE",
		"Gives the filesystem back the space of discarded and all-zero clusters: all-zero clusters are\n"+
			"unallocated (in a stack's top delta only where the deltas below read zeros too), the clusters\n"+
			"at the end of the file move into the free ones below, and the file is truncated. The contents\n"+
			"never change; an interrupted compaction is undone by `check --repair`. If DIR (a stack: its\n"+
			"top delta) is being served, the serving process compacts it with I/O paused meanwhile; an\n"+
			"IMAGE must not be in use.", stderr)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one DIR or IMAGE")
	}
	var res ploop.CompactResult
	var err error
	if ploop.IsStackDir(pos[0]) {
		res, err = compactStack(pos[0])
	} else {
		res, err = compactImage(pos[0])
	}
	if err != nil {
		return failf(stderr, "compact", err)
	}
	if *asJSON {
		b, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			return failf(stderr, "compact", err)
		}
		fmt.Fprintf(stdout, "%s\n", b)
		return exitOK
	}
	fmt.Fprintf(stdout, "file size %d -> %d bytes; %d zero clusters unallocated, %d kept (they hide lower data), %d clusters moved\n",
		res.FileSizeBefore, res.FileSizeAfter, res.ZeroClusters, res.KeptZeroClusters, res.MovedClusters)
	return exitOK
}

// compactStack compacts through the control socket when the stack is
// served, offline otherwise.
func compactStack(dir string) (ploop.CompactResult, error) {
	rep, err := callServed(dir, serving.Request{Op: serving.OpCompact})
	if errors.Is(err, serving.ErrNotServed) {
		return ploop.CompactStack(dir)
	}
	if err != nil {
		return ploop.CompactResult{}, err
	}
	if rep.Compact == nil {
		return ploop.CompactResult{}, fmt.Errorf("served stack %s: the reply has no compaction result", dir)
	}
	return *rep.Compact, nil
}

func compactImage(path string) (ploop.CompactResult, error) {
	img, err := ploop.Open(path, ploop.OpenOptions{})
	if err != nil {
		return ploop.CompactResult{}, err
	}
	res, err := img.Compact()
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return res, err
}
