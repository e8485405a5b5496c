// Package driver is ploop-csi's CSI layer: a translator from the CSI
// Identity, Controller and Node services to calls on the storage root's
// catalogue (package catalog: volumes and snapshots of both types,
// capacity) and the node's attachments (the Node interface: serving stacks
// to the kernel, filesystems, mounts, online operations). Neither knows any
// CSI type; this package knows nothing of formats, devices or mounts.
//
// # What the translator does
//
//   - Validates every request before any call below: volume ids with
//     catalog.ParseVolumeID, snapshot ids with catalog.ValidateSnapshotID
//     (a string that could escape a path is InvalidArgument, a safe string
//     that names no object of ours is NotFound), staging and target paths
//     absolute, clean, outside the storage root and, when configured, below
//     the kubelet's directory, capabilities (single-node access modes, ext4
//     or xfs, no Block for simfs) and StorageClass parameters (unknown keys
//     are refused).
//   - Keeps calls idempotent as the CSI spec asks: creation by name (the
//     catalogue), deletion of what is gone, unstage and unpublish of what
//     is not there, repeats of stage, publish and expansion.
//   - Maps errors to gRPC codes in one place (errors.go), with the text of
//     the layer below, which says what to do.
//   - Logs each call once (interceptor.go) and turns a panic in one call
//     into Internal without stopping the process.
//
// # Errors
//
// Handlers return Go errors wrapping the classes of package catalog and of
// Node (node.go); the interceptor maps them with errorTable:
//
//	catalog.ErrInvalid, ErrNodeInvalid            InvalidArgument
//	catalog.ErrNotFound, ErrNotStaged             NotFound (ErrNotStaged in NodePublishVolume: FailedPrecondition)
//	catalog.ErrExists, ErrConflict                AlreadyExists
//	catalog.ErrOutOfRange                         OutOfRange
//	catalog.ErrNoSpace, catalog.ErrLimit          ResourceExhausted
//	catalog.ErrInUse, catalog.ErrPrecondition,
//	ErrInUse, ErrOtherTarget, ErrNotAttached,
//	ErrVolumeUnavailable                          FailedPrecondition
//	catalog.ErrBusy, catalog.ErrBadToken,
//	ErrNodeBusy                                   Aborted
//	catalog.ErrUnavailable                        Unavailable
//	context.DeadlineExceeded, ETIMEDOUT           DeadlineExceeded
//	context.Canceled                              Canceled
//	ENOSPC, EDQUOT                                ResourceExhausted
//	EROFS                                         Unavailable
//	fs.ErrNotExist                                NotFound
//	fs.ErrPermission, EBUSY                       FailedPrecondition
//	anything else, a panic                        Internal
//
// Probe fails with FailedPrecondition and the reason while the storage root
// is missing, read-only or full (catalog.Health).
//
// # Topology and capacity
//
// Volumes are node-local: every volume is accessible from the segment
// {topology.csi.ploop.io/node: <node id>} only. CreateVolume whose
// requisite topology excludes this node is ResourceExhausted, so that a
// scheduler tries another node; GetCapacity for another node's segment, for
// capabilities no volume here can have, or for simfs volumes on a root
// without enforced project quota (none could be created), is 0; otherwise
// it is what the catalogue can still promise (size × overcommit ratio −
// provisioned).
//
// # Volume condition
//
// CSI 1.13 removed VolumeCondition; the COs in use still read it. The
// driver claims VOLUME_CONDITION by its old capability numbers and sends
// VolumeCondition as 1.12 defines it (condition.go).
//
// # Modes
//
// ModeAll runs every service in one process over a local storage root; the
// catalogue's online operations are the Node's (OnlineOf). In a cluster,
// ModeNode runs the node services over the node's own catalogue and
// attachments, and ModeController runs the controller service over a
// Cluster (package clustercatalog), which reaches each node's catalogue
// through custom resources: CreateVolume places a volume on the node its
// content source is on, or else on the first preferred (then requisite)
// topology segment; GetCapacity answers for the node a segment names;
// volumes report their own node's segment.
//
// With Config.SharedRoot the root is one filesystem on every node: the
// plugin claims no accessibility constraints, volumes and NodeGetInfo
// carry no topology, any requirement is met, and simfs volumes are refused
// (InvalidArgument: their quota needs a node's own filesystem). The
// controller's Catalog is then the root's own catalogue (a
// clustercatalog.Shared, which also tidies), and a node's is a
// catalog.View of the records, which changes nothing.
package driver
