package main

import (
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
)

func runInfo(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("info", "[--json] IMAGE|DIR",
		"Prints the geometry and allocation of a ploop image (works on images that need repair),\n"+
			"or of every delta of a stack directory.", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "need exactly one IMAGE or DIR")
	}
	if ploop.IsStackDir(pos[0]) {
		return infoStack(pos[0], *asJSON, stdout, stderr)
	}
	info, err := ploop.Inspect(pos[0])
	if err != nil {
		return failf(stderr, "info", err)
	}
	if *asJSON {
		b, err := json.MarshalIndent(info, "", "  ")
		if err != nil {
			return failf(stderr, "info", err)
		}
		fmt.Fprintf(stdout, "%s\n", b)
		return exitOK
	}
	inUse := "no"
	if info.InUse {
		inUse = "yes (not closed cleanly: run ploopctl check --repair)"
	}
	fmt.Fprintf(stdout, "image:              %s\n", info.Path)
	fmt.Fprintf(stdout, "format:             ploop v%d\n", info.Version)
	fmt.Fprintf(stdout, "virtual size:       %s (%d bytes)\n", humanBytes(info.VirtualSize), info.VirtualSize)
	fmt.Fprintf(stdout, "cluster size:       %d\n", info.ClusterSize)
	fmt.Fprintf(stdout, "allocated clusters: %d (%s, %d bytes)\n", info.AllocatedClusters, humanBytes(info.AllocatedBytes), info.AllocatedBytes)
	fmt.Fprintf(stdout, "file size:          %d\n", info.FileSize)
	fmt.Fprintf(stdout, "disk usage:         %d\n", info.DiskUsage)
	fmt.Fprintf(stdout, "in use:             %s\n", inUse)
	if info.ExtensionOffset != 0 {
		fmt.Fprintf(stdout, "format extension:   at %d\n", info.ExtensionOffset)
	}
	if info.Problems != 0 {
		fmt.Fprintf(stdout, "problems:           %d (run ploopctl check)\n", info.Problems)
	}
	return exitOK
}

// humanBytes renders n with a binary unit, e.g. 10 GiB or 1.5 MiB.
func humanBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v := float64(n)
	u := 0
	for v >= 1024 && u < len(units)-1 {
		v /= 1024
		u++
	}
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d %s", int64(v), units[u])
	}
	return fmt.Sprintf("%.1f %s", v, units[u])
}

// stackInfo is info's description of a stack directory.
type stackInfo struct {
	Dir         string      `json:"dir"`
	VirtualSize int64       `json:"virtual_size"`
	ClusterSize int64       `json:"cluster_size"`
	Deltas      []deltaInfo `json:"deltas"`
}

type deltaInfo struct {
	ploop.SnapshotInfo
	// Image is the delta's image info; nil for a raw base.
	Image *ploop.Info `json:"image,omitempty"`
}

func infoStack(dir string, asJSON bool, stdout, stderr io.Writer) int {
	d, err := ploop.ReadDescriptor(dir)
	if err != nil {
		return failf(stderr, "info", err)
	}
	list, err := ploop.ListSnapshots(dir)
	if err != nil {
		return failf(stderr, "info", err)
	}
	si := stackInfo{Dir: dir, VirtualSize: d.Size(), ClusterSize: d.ClusterSize()}
	for _, s := range list {
		di := deltaInfo{SnapshotInfo: s}
		if s.Type == ploop.TypeCompressed {
			if di.Image, err = ploop.Inspect(filepath.Join(dir, s.File)); err != nil {
				return failf(stderr, "info", err)
			}
		}
		si.Deltas = append(si.Deltas, di)
	}
	if asJSON {
		b, err := json.MarshalIndent(si, "", "  ")
		if err != nil {
			return failf(stderr, "info", err)
		}
		fmt.Fprintf(stdout, "%s\n", b)
		return exitOK
	}
	fmt.Fprintf(stdout, "stack:              %s\n", dir)
	fmt.Fprintf(stdout, "virtual size:       %s (%d bytes)\n", humanBytes(si.VirtualSize), si.VirtualSize)
	fmt.Fprintf(stdout, "cluster size:       %d\n", si.ClusterSize)
	fmt.Fprintf(stdout, "deltas:             %d (base first)\n", len(si.Deltas))
	for _, di := range si.Deltas {
		role := "snapshot"
		if di.Top {
			role = "top"
		}
		alloc := "raw"
		if di.Image != nil {
			alloc = fmt.Sprintf("%d clusters allocated", di.Image.AllocatedClusters)
			if di.Image.InUse {
				alloc += ", in use"
			}
		}
		fmt.Fprintf(stdout, "  %-8s %s %s (%s, links %d)\n", role, di.GUID, di.File, alloc, di.Links)
	}
	return exitOK
}
