// Package attachments is the node's side of ploop-csi: what a node has
// staged and published, and how it gets it back after a restart. It knows
// no CSI types; pkg/driver translates CSI calls into calls on a Manager.
//
// For a ploop volume (a stack directory under the storage root) Stage opens
// the stack, serves it with pkg/serving to a kernel nbd device whose
// backend identifier is the volume id, makes a filesystem on it when it is
// blank (ext4 or xfs) and mounts it at the staging path; a Block volume
// stops after the attach. Publish bind-mounts the staging mount, or the
// device node for Block, onto each target; a single-writer publish is the
// volume's only target. For a simfs volume (a directory
// of a simfs root) Stage checks the directory and its quota, and Publish
// bind-mounts the directory. All mount and mkfs work goes through
// pkg/mounts.
//
// A ploop volume reaches the kernel through nbd or ublk (Transport): the
// node's default (Options.Attach.Transport: nbd, ublk, or auto after a
// start-up self-test), or what the volume asks for; the record keeps it,
// so a volume keeps its transport until it is unstaged.
//
// # State and restart
//
// The state directory (by default <storage root>/nodes/<node id>/) holds a
// lock file and one JSON record per staged volume (volumes/<id>.json: kind,
// stack or directory path, staging path, filesystem and options, nbd
// device, publish targets), each replaced atomically (temporary file,
// fsync, rename, fsync of the directory). A record is written before the
// step it announces, so a process killed at any point leaves a record of
// everything it may have made, and every operation completes or undoes
// what an interrupted one left.
//
// The kernel device outlives the node plugin: when the process dies, the
// kernel holds the device's I/O for DeadConnTimeout. New reads the records
// before it returns, matches them with /sys/block/nbd*/backend, repairs
// each stack (the in-use mark a killed server leaves, an interrupted online
// operation), reopens it and hands the same device fresh connections
// (pkg/serving's Reattach). The filesystem above sees no error. A volume
// whose device is gone after a reboot is staged again; a volume whose
// image is gone or cannot be opened is reported abnormal; nothing else is
// touched. Close stops serving without detaching anything, for the next
// process to take over.
//
// # Online operations
//
// Only the process that serves a stack may change it. Snapshot,
// DeleteSnapshot, Grow and Compact run the catalogue's operations on a
// served stack, and fail with ErrNotAttached when this node does not serve
// the volume, so that the catalogue runs the offline operation instead.
// Expand grows a staged volume's stack, device and filesystem.
//
// # Space and health
//
// Freed filesystem blocks reach the image as NBD TRIM requests and become
// holes in the top delta: every TrimInterval each staged ploop filesystem
// is trimmed (FITRIM), and a volume staged with OnlineDiscard is mounted
// with "discard". Stats reports usage (from the filesystem, or from the
// quota for simfs) and a condition that is abnormal, with a message a
// person can act on, when the nbd link is dead, the image is gone or could
// not be reopened, the ext4 filesystem logged errors, or the storage root
// is nearly full.
//
// # Safety and concurrency
//
// Volume ids and every path are validated before any filesystem call:
// volume paths must lie below the storage root and resolve to themselves,
// staging and target paths must be absolute, clean, outside the storage
// root and state directory, and below Options.PathPrefixes when set. No
// network port is opened: NBD runs over socketpairs. One nbd.Server
// serves every ploop volume of the Manager, an export each: a panic in one
// volume's request path fails that export alone, and the volume's
// condition says so; the others and the process carry on. A staged volume
// of either kind counts as attached for the catalogue (Attached), which
// then refuses to delete it. Operations on one
// volume are serialised by a per-volume lock whose wait ends with the
// caller's context (ErrBusy); operations on different volumes run in
// parallel, and a failure of one volume is that volume's alone.
package attachments
