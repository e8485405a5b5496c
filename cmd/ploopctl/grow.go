package main

import (
	"errors"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"github.com/ploop-csi/ploop-csi/pkg/serving"
)

func runGrow(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("grow", "-s SIZE DIR",
		"Grows the virtual disk of the stack in DIR to SIZE (online if DIR is being served:\n"+
			"the serving process grows it and resizes its kernel device). Only the top delta\n"+
			"changes; snapshots keep their size. Growing so far that the BAT would reach the data clusters\n"+
			"(past 256 GiB with 1 MiB clusters) first moves those clusters to the end of the file.", stderr)
	var size sizeFlag
	fs.Var(&size, "s", "new virtual disk `SIZE` (rounded up to 512 bytes)")
	fs.Var(&size, "size", "same as -s")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one DIR")
	}
	if !size.set || size.n <= 0 {
		return usageError(fs, stderr, "-s SIZE is required and must be positive")
	}
	_, err := callServed(pos[0], serving.Request{Op: serving.OpGrow, Size: size.n})
	if errors.Is(err, serving.ErrNotServed) {
		err = ploop.GrowStack(pos[0], size.n)
	}
	if err != nil {
		return failf(stderr, "grow", err)
	}
	return exitOK
}
