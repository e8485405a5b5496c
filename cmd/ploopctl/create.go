package main

import (
	"fmt"
	"io"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runCreate(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("create", "--size SIZE [--cluster-size SIZE] IMAGE",
		"Creates an empty, sparse ploop image (version 2, as qemu-img create -f parallels does).\nSIZE: bytes or 64K, 512M, 10G, 1T.", stderr)
	var size, cluster sizeFlag
	fs.Var(&size, "size", "virtual disk `SIZE` (required; rounded up to 512 bytes)")
	fs.Var(&cluster, "cluster-size", "cluster `SIZE`: a power of two from 32K to 64M (default 1M)")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one IMAGE")
	}
	if !size.set || size.n <= 0 {
		return usageError(fs, stderr, "--size is required and must be positive")
	}
	if cluster.set {
		if err := ploop.ValidClusterSize(cluster.n); err != nil {
			return usageError(fs, stderr, "--cluster-size: %v", err)
		}
	}
	img, err := ploop.Create(pos[0], ploop.CreateOptions{Size: size.n, ClusterSize: cluster.n})
	if err != nil {
		return failf(stderr, "create", err)
	}
	if err := img.Close(); err != nil {
		return failf(stderr, "create", err)
	}
	fmt.Fprintf(stdout, "created %s: virtual size %d, cluster size %d\n", pos[0], img.Size(), img.ClusterSize())
	return exitOK
}
