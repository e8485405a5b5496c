package ploop

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Info describes an image file for people and tools (ploopctl info).
type Info struct {
	Path              string `json:"path"`
	Version           int    `json:"version"`
	VirtualSize       int64  `json:"virtual_size"`
	ClusterSize       int64  `json:"cluster_size"`
	AllocatedClusters int64  `json:"allocated_clusters"`
	// AllocatedBytes is AllocatedClusters times the cluster size: what the
	// virtual disk has claimed, whatever the file's holes.
	AllocatedBytes int64 `json:"allocated_bytes"`
	FileSize       int64 `json:"file_size"`
	// DiskUsage is the space the file occupies on the host filesystem.
	DiskUsage int64 `json:"disk_usage"`
	InUse     bool  `json:"in_use"`
	// DataOffset is the first data byte; ExtensionOffset is the byte
	// offset of the format extension, 0 for none.
	DataOffset      int64 `json:"data_offset"`
	ExtensionOffset int64 `json:"extension_offset"`
	// Problems counts what Check would report.
	Problems int `json:"problems"`
}

// Inspect reads the header and BAT of the image at path without opening it
// for I/O, so that it also describes images that need repair.
func Inspect(path string) (*Info, error) {
	s, err := openStorage(path, true, false)
	if err != nil {
		return nil, fmt.Errorf("inspect: %w", err)
	}
	defer s.Close()
	h, meta, fileSize, err := readMeta(s, path)
	if err != nil {
		return nil, fmt.Errorf("inspect: %w", err)
	}
	a := analyze(h, meta, fileSize)
	var usage int64
	if st, err := os.Stat(path); err == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			usage = sys.Blocks * 512
		}
	}
	return &Info{
		Path: path, Version: h.Version, VirtualSize: h.Size(), ClusterSize: h.ClusterSize(),
		AllocatedClusters: a.allocated, AllocatedBytes: a.allocated * h.ClusterSize(),
		FileSize: fileSize, DiskUsage: usage, InUse: h.InUseMarked(),
		DataOffset: int64(h.DataOff) * SectorSize, ExtensionOffset: int64(h.ExtOff) * SectorSize,
		Problems: len(a.problems),
	}, nil
}

// IsImage reports whether the file at path starts with a ploop header
// signature (a damaged header still counts: Open reports what is wrong).
// Anything else is taken to be a raw image.
func IsImage(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	b := make([]byte, 16)
	if _, err := io.ReadFull(f, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return false, nil
		}
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	return string(b) == sigV1 || string(b) == sigV2, nil
}
