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
// One Server serves many exports (one per volume in the node plugin),
// added and removed while it runs (Add, Remove). A panic while serving an
// export, in its Backend or in this package, fails that request with EIO
// and the export from then on (ErrExportFailed, Server.Failed,
// Export.OnFailure); the stack is logged, and the other exports and the
// process carry on. ServerOptions bound what clients of Serve can make it
// hold: a handshake deadline, a connection cap and a per-connection cap
// on buffered payload bytes.
//
// The kernel half (kernel.go) connects sockets to /dev/nbdN with CONNECT,
// grows devices with RECONFIGURE, and re-attaches a device after the
// serving process restarted: the device is found by its backend
// identifier, and fresh sockets replace the ones the kernel reports dead
// while DEAD_CONN_TIMEOUT holds the I/O.
//
// # Slow requests and the kernel's timeout
//
// The kernel's nbd driver (drivers/block/nbd.c, nbd_xmit_timeout; read in
// Debian's 6.1.192 and measured in the test VM, kernel_timeout_vm_test.go)
// handles a request that outlives its timeout in one of two ways:
//
//   - more than one connection, or a timeout set (NBD_ATTR_TIMEOUT > 0):
//     it shuts the request's connection down ("Connection timed out,
//     retrying", LINK_DEAD) and resends the request on another connection,
//     or, when none is left, on the next one RECONFIGURE installs. With
//     timeout 0 this happens after the block layer's own request timeout,
//     30 s. Measured, a write held 5 s with a 1 s timeout: sent twice with
//     two connections (timeout 0 or 1 s) and with one connection and a 1 s
//     timeout; the kernel never failed it.
//   - one connection and timeout 0: it only logs "Possible stuck request"
//     and re-arms the timer, every 30 s, for as long as the request takes
//     (measured: a write held 40 s was sent once and succeeded). The
//     request is resent only if its connection was replaced meanwhile,
//     which is what a restarted server needs (measured: a write in flight
//     when the server was SIGKILLed completed 31 s after the kill, once a
//     new process had re-attached).
//
// Either way a timeout does not fail the request; what fails requests is
// DEAD_CONN_TIMEOUT running out while no connection is alive.
//
// A request the kernel itself loses: the thread that submits a request
// sends it on the socket, and a signal that interrupts a send after part
// of it went out makes 6.1 requeue the request (NBD_CMD_REQUEUED) although
// its handle already reached the server, whose reply then finds nothing.
// Upstream fixed it ("nbd: fix partial sending", later kernels send the
// rest from a work item); Debian's 6.1.192 nbd.ko has neither fix. Seen
// once in the power-loss test (Go writers, whose threads get preemption
// signals; two connections and a 10-minute timeout): the workload stalled
// until "Connection timed out, retrying" resent the write 10 minutes
// later; that this bug, not the server, held it is likely but unproven
// (the test now dumps every stack after a minute without progress). With
// one connection
// and timeout 0 the kernel would re-arm its timer for ever. Writers in a
// pod (O_DIRECT, or fsync writing back in the caller's thread) can hit it
// too; the cure is the kernel's.
//
// A resent request may still be running here, and its first copy could
// land after a newer write to the same block. Two things prevent that:
//
//   - AttachOptions defaults to one connection and no timeout, the only
//     configuration in which the kernel neither resends nor fails a slow
//     request, while a restart still completes requests in flight;
//   - for any other configuration, the server orders the writes of an
//     export by arrival across its connections (writeOrder), so a resent
//     copy waits for the first, and drops a write from a kernel
//     connection that the kernel has already shut down instead of running
//     it (measured with two connections and a 1 s timeout: the resent
//     copy waited, and the block ended with the newer data).
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
