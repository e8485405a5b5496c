// Package mounts is the one place in ploop-csi that runs mount, mkfs and the
// filesystem tools (through k8s.io/mount-utils, which execs mount, umount,
// blkid, fsck, mkfs.*, resize2fs and xfs_growfs) and the one place that
// issues filesystem ioctls on mount points (FITRIM, FIFREEZE, FITHAW,
// XFS_IOC_FSGEOMETRY). Nothing else may exec a mount or mkfs tool.
//
// A Mounter formats a block device when it is blank and mounts it with the
// caller's options (FormatAndMount), bind-mounts a directory onto a
// directory or a device node onto a file (BindMount), and unmounts and
// removes a mount point idempotently (Unmount: a target that is already
// gone succeeds). Grow resizes a mounted filesystem to its device and
// checks that the filesystem itself now reports the size.
//
// # xfs clones
//
// A copy-on-write clone of an xfs volume carries the source's filesystem
// UUID, and xfs refuses to mount a second filesystem with a UUID that is
// already mounted. FormatAndMount mounts every xfs filesystem with
// "nouuid" instead of regenerating the UUID (xfs_admin -U generate): a
// clone made from a snapshot of a mounted filesystem has a dirty log, which
// xfs_admin refuses to touch until a mount has replayed it, and that mount
// would need nouuid anyway. nouuid only skips the duplicate check; it is
// what TopoLVM does for its LVM snapshots.
//
// All paths are taken as given: callers validate them (absolute, clean,
// inside the directories they may touch) before calling.
package mounts
