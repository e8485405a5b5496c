package catalog

import "context"

// Online carries out operations on ploop volumes that a node process has
// open and serves: only the process that serves a stack may change it
// (DESIGN.md §3), and it holds the stack directory's lock meanwhile, so the
// offline ploop functions could not run anyway. In all-in-one mode the
// node's attachments implement it in-process; with Kubernetes a custom
// resource reconciled by the owning node does.
//
// Every method returns an error wrapping ErrNotAttached when the volume is
// not attached anywhere; the catalogue then runs the offline ploop function
// itself, which takes the stack's lock, so a volume attached in between
// makes one side fail cleanly (ErrInUse here) rather than both write. Any
// other error is returned to the caller as it is: the operation may or may
// not have run, and every operation is safe to repeat.
type Online interface {
	// Attached reports whether the volume (of either type) is staged on a
	// node; DeleteVolume refuses attached volumes.
	Attached(ctx context.Context, volumeID string) (bool, error)
	// Snapshot freezes the served stack's top delta and returns the GUID
	// of the frozen delta (ploop.Stack.Snapshot).
	Snapshot(ctx context.Context, volumeID string) (guid string, err error)
	// DeleteSnapshot merges the delta guid into the delta above it
	// (ploop.Stack.DeleteSnapshot).
	DeleteSnapshot(ctx context.Context, volumeID, guid string) error
	// Grow sets a larger virtual size (ploop.Stack.Grow); telling the
	// kernel about it is the node's expansion step.
	Grow(ctx context.Context, volumeID string, size int64) error
	// Compact compacts the top delta (ploop.Stack.Compact).
	Compact(ctx context.Context, volumeID string) error
}
