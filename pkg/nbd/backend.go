// Package nbd is the device layer of ploop-csi: it serves a block backend
// over the NBD protocol and hands such connections to the kernel's nbd
// driver through generic netlink.
//
// The model has two halves. Server speaks the protocol: external clients
// (qemu, libnbd tools, benchmarks) go through the fixed-newstyle handshake
// with ServeConn or Serve; the kernel, which does no handshake, gets
// already-negotiated socketpairs served by ServeTransmission. Requests on
// one connection run concurrently and are answered out of order; every
// connection of an export shares one Backend, whose Flush covers all writes
// it has completed, so a FLUSH on any connection covers writes acknowledged
// on all of them (CAN_MULTI_CONN).
//
// The kernel half (kernel.go) connects sockets to /dev/nbdN with CONNECT,
// grows devices with RECONFIGURE, and re-attaches a device after the
// serving process restarted: the device is found by its backend
// identifier, and fresh sockets replace the ones the kernel reports dead
// while DEAD_CONN_TIMEOUT holds the I/O.
//
// The package knows nothing about image formats: ploop images and raw files
// both satisfy Backend.
package nbd

import (
	"errors"
	"syscall"
)

// Backend is the block device an export serves. Implementations must be
// safe for concurrent use: the server runs requests in parallel.
//
// A kernel device outlives the serving process (see Reattach), so once
// WriteAt, Discard or WriteZeroes has returned, the change must be visible
// to a new process that opens the same storage, even if this one is
// killed before the next Flush: the kernel has been told it is done and
// will not send it again. Being in the host page cache is enough; Flush
// is what makes it survive a host crash.
type Backend interface {
	// Size is the current device size in bytes.
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every write that has returned durable, whichever
	// connection issued it.
	Flush() error
	// Discard releases a range; afterwards it reads as zeroes.
	Discard(off, length int64) error
	// WriteZeroes zeroes a range; with noHole the space stays allocated.
	WriteZeroes(off, length int64, noHole bool) error
	// Extent reports the run starting at off that is uniformly allocated
	// or not: 0 < n <= length. Unallocated runs read as zeroes.
	Extent(off, length int64) (n int64, allocated bool, err error)
	ReadOnly() bool
}

// errorCode maps a backend error to the NBD error value the protocol
// defines for it; anything unknown is an I/O error.
func errorCode(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EACCES):
		return errPerm
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, syscall.EINVAL):
		return errInval
	case errors.Is(err, syscall.ENOMEM):
		return errNoMem
	case errors.Is(err, syscall.EOVERFLOW):
		return errOverflow
	case errors.Is(err, syscall.ENOTSUP): // == EOPNOTSUPP on Linux
		return errNotSup
	case errors.Is(err, syscall.ESHUTDOWN):
		return errShutdown
	default:
		return errIO
	}
}
