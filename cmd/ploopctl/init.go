package main

import (
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runInit(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("init", "-s SIZE [--cluster-size SIZE] [--raw-base] DIR",
		"Creates a ploop stack in DIR (made if missing, else it must be empty): DiskDescriptor.xml and\n"+
			"the base delta root.hds, a sparse ploop image or, with --raw-base, a raw (\"Plain\") file.", stderr)
	var size, cluster sizeFlag
	fs.Var(&size, "s", "virtual disk `SIZE` (required; rounded up to 512 bytes)")
	fs.Var(&size, "size", "same as -s")
	fs.Var(&cluster, "cluster-size", "cluster `SIZE`: a power of two from 32K to 64M (default 1M)")
	rawBase := fs.Bool("raw-base", false, "make the base delta a raw file")
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
	if cluster.set {
		if err := ploop.ValidClusterSize(cluster.n); err != nil {
			return usageError(fs, stderr, "--cluster-size: %v", err)
		}
	}
	if err := ploop.InitStack(pos[0], ploop.InitOptions{Size: size.n, ClusterSize: cluster.n, RawBase: *rawBase}); err != nil {
		return failf(stderr, "init", err)
	}
	fmt.Fprintf(stdout, "initialized %s\n", pos[0])
	return exitOK
}
