package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/ploop-csi/ploop-csi/pkg/ploop"
	"golang.org/x/sys/unix"
)

// convertSource is what convert reads: a ploop image or a raw file.
type convertSource interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	Extent(off, length int64) (int64, bool, error)
	Close() error
}

// convertTarget is what convert writes.
type convertTarget interface {
	WriteAt(p []byte, off int64) (int, error)
	Close() error
}

func runConvert(args []string, stdout, stderr io.Writer) int {
	fs := newVerbFlags("convert", "[-f raw|ploop] [-O raw|ploop] [--cluster-size SIZE] [-u GUID] SRC DST",
		"Copies a disk image into a new file, like qemu-img convert: ranges that are unallocated or all\n"+
			"zeros in SRC stay holes (raw) or unallocated clusters (ploop) in DST. SRC's format is detected\n"+
			"when -f is absent; -O defaults to raw as in qemu-img. DST must not exist.\n"+
			"SRC may be a stack directory: its merged view is exported, or with -u the state snapshot GUID froze.", stderr)
	snap := fs.String("u", "", "with a stack directory SRC: export snapshot `GUID`")
	srcFmt := fs.String("f", "", "source `FORMAT`: raw or ploop (default: detected)")
	dstFmt := fs.String("O", "raw", "output `FORMAT`: raw or ploop")
	var cluster sizeFlag
	fs.Var(&cluster, "cluster-size", "cluster `SIZE` of a ploop DST (default 1M)")
	pos, code, ok := parseVerbArgs(fs, args)
	if !ok {
		return code
	}
	if len(pos) != 2 {
		return usageError(fs, stderr, "need SRC and DST")
	}
	for _, f := range []string{*srcFmt, *dstFmt} {
		if f != "" && f != "raw" && f != "ploop" {
			return usageError(fs, stderr, "unknown format %q (want raw or ploop)", f)
		}
	}
	if cluster.set && *dstFmt != "ploop" {
		return usageError(fs, stderr, "--cluster-size needs -O ploop")
	}
	if cluster.set {
		if err := ploop.ValidClusterSize(cluster.n); err != nil {
			return usageError(fs, stderr, "--cluster-size: %v", err)
		}
	}
	src, dst := pos[0], pos[1]
	if ploop.IsStackDir(src) {
		if *srcFmt != "" {
			return usageError(fs, stderr, "-f does not apply to a stack directory")
		}
		if *snap != "" && !ploop.ValidGUID(*snap) {
			return usageError(fs, stderr, "-u needs a GUID like {5fbaabe3-6958-40ff-92a7-860e329aab41}")
		}
		*srcFmt = "stack:" + *snap
	} else if *snap != "" {
		return usageError(fs, stderr, "-u needs a stack directory as SRC")
	}
	if *srcFmt == "" {
		isPloop, err := ploop.IsImage(src)
		if err != nil {
			return failf(stderr, "convert", err)
		}
		*srcFmt = map[bool]string{true: "ploop", false: "raw"}[isPloop]
	}
	if _, err := os.Lstat(dst); err == nil {
		return failf(stderr, "convert", fmt.Errorf("%s already exists: %w", dst, os.ErrExist))
	}
	if err := convert(src, *srcFmt, dst, *dstFmt, cluster.n); err != nil {
		return failf(stderr, "convert", err)
	}
	return exitOK
}

func convert(srcPath, srcFmt, dstPath, dstFmt string, cluster int64) (err error) {
	var src convertSource
	if guid, ok := strings.CutPrefix(srcFmt, "stack:"); ok {
		src, err = ploop.OpenStack(srcPath, ploop.StackOptions{ReadOnly: true, Snapshot: guid})
	} else if srcFmt == "ploop" {
		src, err = ploop.Open(srcPath, ploop.OpenOptions{ReadOnly: true})
	} else {
		src, err = ploop.OpenRaw(srcPath, true)
	}
	if err != nil {
		return err
	}
	defer src.Close()
	size := src.Size()
	var dst convertTarget
	chunk := int64(1 << 20)
	if dstFmt == "ploop" {
		img, err := ploop.Create(dstPath, ploop.CreateOptions{Size: size, ClusterSize: cluster})
		if err != nil {
			return err
		}
		dst, chunk = img, img.ClusterSize()
	} else {
		dst, err = createRaw(dstPath, size)
		if err != nil {
			return err
		}
	}
	defer func() {
		if cerr := dst.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dstPath)
		}
	}()
	return copyAllocated(src, dst, size, chunk)
}

func createRaw(path string, size int64) (*ploop.Raw, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	return ploop.OpenRaw(path, false)
}

// copyAllocated copies src to dst in chunk-sized, chunk-aligned pieces,
// skipping pieces that src reports unallocated or that read as all zeros.
func copyAllocated(src convertSource, dst convertTarget, size, chunk int64) error {
	buf := make([]byte, chunk)
	for off := int64(0); off < size; off += chunk {
		n := min(chunk, size-off)
		alloc, err := anyAllocated(src, off, n)
		if err != nil {
			return err
		}
		if !alloc {
			continue
		}
		b := buf[:n]
		if _, err := src.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		if isZero(b) {
			continue
		}
		if _, err := dst.WriteAt(b, off); err != nil {
			return err
		}
	}
	return nil
}

func anyAllocated(src convertSource, off, n int64) (bool, error) {
	for end := off + n; off < end; {
		l, alloc, err := src.Extent(off, end-off)
		if err != nil {
			return false, err
		}
		if alloc {
			return true, nil
		}
		off += l
	}
	return false, nil
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
