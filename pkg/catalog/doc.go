// Package catalog is the storage root's catalogue: which volumes and
// snapshots exist, of both types (ploop stacks and simfs directories), by
// name and by id, with their parameters, content sources and sizes; it
// creates, deletes, snapshots, clones and expands them, and accounts for the
// root's capacity. It knows nothing of CSI: errors wrap the classes in
// errors.go, which the CSI layer maps to gRPC codes in one place.
//
// # Layout
//
// Under the storage root:
//
//	catalog/lock                  flock held by the process that owns the catalogue
//	catalog/volumes/<id>.json     one record per volume (JSON, replaced atomically)
//	catalog/snapshots/<id>.json   one record per snapshot
//	ploop/volumes/<id>/           a ploop volume's stack (DiskDescriptor.xml, root.hds*)
//	ploop/snapshots/<id>/         a ploop snapshot's own stack: hard links to the
//	                              frozen deltas plus an empty top
//	simfs/                        the simfs.Root of simfs volumes and snapshots,
//	                              opened on the first simfs request, or opened
//	                              once by a process that shares it with the
//	                              node's attachments (OpenSimfs, Options.SimfsRoot)
//
// Records are written to a temporary file that is fsynced, renamed into
// place, and the directory fsynced. Records are the truth about what
// exists; the index in memory is loaded from them at Open.
//
// # Ids
//
// Ids are generated, opaque and typed: "ploop-<uuid>" and "simfs-<uuid>"
// for volumes (a node can tell how to stage one without asking), and
// "snap-<uuid>" for snapshots. ParseVolumeID and ValidateSnapshotID check
// every id before anything touches the filesystem: a string that could
// escape a path component ("../x", "/etc", NUL, more than 128 bytes) is
// ErrInvalid; a safe string that is not an id of the right kind (a
// snapshot id passed as a volume id) is ErrNotFound. Paths are built only
// from checked ids under directories this package created, none of which is
// reached through a symlink; removal never follows symlinks.
//
// # Sharing deltas
//
// A ploop snapshot is O(1) whatever the data: the volume's top delta is
// frozen (online by the process serving it when attached, see Online) and
// ploop.Clone makes the snapshot a stack of its own whose lower deltas are
// hard links to the volume's frozen deltas. Restoring is ploop.Clone again,
// from the snapshot's stack into a new volume (grown when a larger size is
// asked for), and a clone of a volume is a snapshot of the volume and a
// clone of it. No delta is ever copied to share it and every stack holds
// its own links, so deleting a volume, a snapshot or a clone never breaks
// another: the link count is the reference count and a delta's space comes
// back when its last stack goes.
//
// A frozen delta that nothing needs any more is merged into the delta
// above it (ploop.DeleteSnapshot, online when attached) to keep chains
// short; OpenVZ caps a chain at 127 deltas. Deleting a snapshot merges the
// delta it was cloned from in its source volume, if the volume still
// exists, even when later snapshots or clones still link that delta: so a
// volume's chain is as long as its live snapshots however many come and go
// (a rotation of daily snapshots never reaches the limit). Such a merge is
// safe for every other stack, including stacks that share the delta above
// it: a stack that links delta k+1 got it by cloning a chain in which k+1
// lay right above the state k+1 was frozen on, and merges only ever replace
// the deltas under a delta by a delta that reads the same, so every stack
// that links k+1 reads, where k+1 has no cluster, exactly what the merged
// delta k holds; copying those clusters into k+1 changes no stack's view
// (TestMergeIntoSharedDelta checks this against pkg/ploop). The price is
// space: clusters of k that another stack still links are then stored
// twice until that stack goes. The delta a clone of a volume was made from
// is not merged while the clone links it (that would copy the whole volume
// for nothing); it is merged once the volume alone links it, or, when the
// chain is full, to make room. Merges copy data, so they take time in
// proportion to it.
//
// # Crash model
//
// A crash (the process killed at any instant; the host losing power after
// the last fsync) leaves nothing stranded. Every operation writes its
// record before it makes anything and removes it after it removed
// everything:
//
//   - create (volume or snapshot): record "creating" → data (stack, clone,
//     simfs directory; a simfs clone first records the id of the copy it
//     goes through) → record "ready". A ploop delta frozen for a snapshot
//     or clone that never became ready is linked by its volume alone, and
//     the volume's next merge pass folds it away;
//   - delete: record "deleting" → data removed → for a ploop snapshot, the
//     merge noted in the source's record → record removed → merges;
//   - expand: the stack or quota first, then the record.
//
// Open, before any request, rolls back every "creating" record (its
// partial data removed), finishes every "deleting" one, removes the
// entries in ploop/ shaped like our stacks that no record accounts for
// (pkg/ploop's clone temporaries included), and raises recorded sizes to
// what an interrupted expansion already gave the stack. pkg/ploop's own
// operations are crash-safe on their own terms (RepairStack restores a
// stack to the state before or after an operation); a stack whose top was
// left with the in-use mark by a dead server is repaired before an offline
// operation uses it. Merges left pending (a node unreachable, a crash) are
// run by Tidy, not by Open, since the volume's node may not be back yet.
//
// # Concurrency
//
// A Catalog is safe for concurrent use: operations lock the name they
// create, then the snapshot, then the volume they touch (in that order,
// never two volumes at once), and wait for a lock only as long as their
// context lets them (ErrBusy). Operations on different volumes run in
// parallel. One process owns a root's catalogue (catalog/lock); a ploop
// stack is changed only by whoever holds pkg/ploop's lock on its directory,
// so an operation that races an attach fails with ErrInUse instead of
// writing under the server.
//
// # Capacity
//
// Capacity promises the root filesystem's size × the overcommit ratio
// minus the provisioned sizes of all volumes of both types, never more
// than the free space × the ratio. A creation or expansion beyond it fails
// at once with ErrNoSpace, checked and recorded as one step. A root whose
// filesystem does not enforce project quota promises nothing to simfs
// volumes (Capacity of type Simfs), since none could be created. Sizes round up
// to 1 MiB for ploop and to simfs's 4 KiB quota unit; a ploop volume has at
// most 2^24 clusters (16 TiB with the default 1 MiB clusters) so that its
// block allocation table stays small in memory.
package catalog
