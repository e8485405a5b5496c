// Package simfs manages directory volumes limited by filesystem project quota.
//
// A Root is a directory on an ext4 or xfs filesystem mounted with project quota
// enforced (ext4: -O quota,project and mount option prjquota; xfs: prjquota).
// Under it simfs keeps:
//
//	.simfs/registry.json  volume id → project ID, limits, snapshots (atomic writes)
//	.simfs/lock           flock serialising registry updates between processes
//	volumes/<id>/         one directory per volume, FS_XFLAG_PROJINHERIT + its project ID
//	snapshots/<id>/       full copies of volume trees (reflinked where possible)
//
// and at the root of the filesystem, shared by every root on it:
//
//	.simfs-projects.lock  flock serialising project-ID allocation
//
// Each volume owns a project ID that is recorded in the registry before the
// directory is made, so IDs survive restarts. IDs are allocated from a
// monotonically increasing counter that is never rewound (a released ID is never
// handed out again by the same root) and every candidate is checked against the
// project IDs the filesystem already accounts for (quota enumeration) and those
// set on existing volume directories, so IDs set by other tools (chattr -p,
// xfs_io) are not reused either (kubernetes#79440).
//
// Project IDs belong to the filesystem, not to a root, and other roots on the
// filesystem see an ID only through the quota. So an ID is chosen and claimed
// (its limits set, which makes the quota list it) under a lock shared by every
// root on the filesystem: an flock on .simfs-projects.lock (mode 0600, so no
// other user can hold it) at the filesystem's root, found through
// /proc/self/mountinfo and checked by mount ID and st_dev. Only then is the ID
// recorded. A read-only mount of the root can still be locked once the file
// exists. When only bind mounts of parts of the filesystem are visible (a
// container), the lock file goes to the shallowest visible directory, which
// serialises only with roots reached through that same directory; the first
// Create logs this. Delete removes the registry entry before it clears the limits, so a
// retried Delete never clears the limits of the ID's next owner. An ID whose
// volume was deleted may be handed out again by another root on the
// filesystem (the quota no longer lists it), never by the root that deleted it.
//
// Limits are byte and inode hard limits set with quotactl_fd(2). Usage comes from
// the quota itself, so it is exact and costs no tree walk. Root (CAP_SYS_RESOURCE)
// bypasses quota; the kernel enforces limits only for unprivileged writers.
//
// The kernel reports an exhausted project quota as EDQUOT on ext4 but as
// ENOSPC on xfs (xfs treats a project like a full filesystem). A volume's own
// directory is charged to it: one inode and one block of the limits. Hard
// links and renames between volumes fail with EXDEV (the filesystems refuse
// to move an inode between projects under PROJINHERIT), so usage never moves
// silently.
//
// Registry updates are serialised across processes (flock); per-volume
// operations are serialised only within one Root, so one process should own a
// root's volumes at a time (the node plugin), as docs/design.md describes.
//
// Trees are walked with directory file descriptors and O_NOFOLLOW, never by
// path, so a volume's owner cannot redirect Delete, Snapshot or Restore outside
// the volume with symlinks or by swapping directories during the walk, and the
// walks do not cross into other mounts.
//
// All identifiers are validated before any filesystem call. Errors wrap ErrInvalid,
// ErrNotFound, ErrExists, ErrConflict or ErrQuotaNotEnforced so the CSI layer can
// map them to gRPC codes, and wrap the underlying syscall errors for errors.Is.
package simfs
