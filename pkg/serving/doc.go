// Package serving runs ploop volumes for the kernel and for NBD clients: it
// opens an image or a stack directory, serves it to a kernel nbd device
// (attach, detach, and re-attach after the serving process was killed) or
// over a listener, runs the online operations of a served stack (snapshot,
// snapshot delete, grow, compact), and answers the same operations from
// other processes on a unix control socket.
//
// It is the layer shared by the CSI node plugin and ploopctl: pkg/ploop
// knows nothing of serving and pkg/nbd knows nothing of ploop; this package
// composes them. Everything a served volume owns hangs off its *Volume, so a
// process may serve any number of volumes; the package has no global state.
//
// Restart model (docs/design.md §5): a kernel device
// outlives the process that serves it. Attach gives the kernel a
// DeadConnTimeout during which it holds I/O when every connection has died.
// A successor process opens the volume with OpenOptions.Repair (the killed
// server left the top delta's in-use mark set, and maybe the leftovers of an
// interrupted online operation) and calls Reattach, which finds the device
// by its backend identifier (/sys/block/nbdN/backend) and hands the kernel
// fresh sockets with RECONFIGURE. The filesystem above sees no error.
//
// A volume may instead be attached through ublk (AttachUblk): a recoverable
// /dev/ublkbN tagged with a hash of the backend identifier, which a
// successor finds by that tag and takes over with ReattachUblk (user
// recovery: the kernel holds, then reissues, the requests in flight). Both
// kinds of device hide behind one interface, so online operations and
// teardown do not care which a volume has; only a grow is refused on a
// ublk device, which cannot change its size on kernels before
// UBLK_F_UPDATE_SIZE.
package serving
