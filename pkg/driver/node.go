package driver

import (
	"context"
	"errors"
	"fmt"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// Node is what the node service needs of the node's attachments: serving
// ploop stacks to the kernel, filesystems, bind mounts, online operations
// and the usage and condition of staged volumes. It knows no CSI types.
// pkg/attachments' Manager, through a thin adapter that converts the
// request structs and wraps its errors in the classes below, is the real
// one; a test may fake it to check the translation above it.
//
// Every method is idempotent in the sense of the CSI spec: a repeat of a
// call that succeeded succeeds again. Errors wrap one of the classes below
// (or of package catalog); anything else is a failure of the node
// (Internal).
type Node interface {
	// Stage makes a volume ready on this node: a ploop volume is served,
	// attached to a kernel device, given a filesystem when blank and
	// mounted at the staging path (Block: attached only); a simfs
	// volume's directory and quota are checked. The same request again
	// succeeds; the volume staged with other parameters or at another
	// path is ErrConflict.
	Stage(ctx context.Context, req StageRequest) error
	// Unstage undoes Stage. A volume not staged here succeeds; a volume
	// still published is ErrInUse.
	Unstage(ctx context.Context, volumeID, stagingPath string) error
	// Publish bind-mounts a staged volume onto the target (a directory, or
	// a file for Block). The same target again succeeds; the same target
	// with other parameters is ErrConflict; a volume not staged is
	// ErrNotStaged; a SingleWriter publish while the volume is published
	// at another target is ErrOtherTarget.
	Publish(ctx context.Context, req PublishRequest) error
	// Unpublish unmounts and removes the target. A target already gone
	// succeeds.
	Unpublish(ctx context.Context, volumeID, targetPath string) error
	// Expand gives a staged ploop volume's device newSize bytes and, unless
	// it is Block, grows its filesystem online at volumePath (the staging
	// path or a target), and returns the size the volume now has. A volume
	// not staged at volumePath is ErrNotStaged.
	Expand(ctx context.Context, volumeID string, newSize int64, volumePath string) (int64, error)
	// Stats reports the usage and condition of a volume staged or
	// published at volumePath (ErrNotStaged otherwise).
	Stats(ctx context.Context, volumeID, volumePath string) (VolumeStats, error)
	// MaxVolumes is how many volumes this node can have staged at once
	// (its nbd devices); 0 means no limit is known.
	MaxVolumes() int

	// The catalogue's online operations on volumes this node serves
	// (catalog.Online); each returns an error wrapping ErrNotAttached when
	// this node does not serve the volume. OnlineOf adapts them.
	Attached(ctx context.Context, volumeID string) (bool, error)
	Snapshot(ctx context.Context, volumeID string) (guid string, err error)
	DeleteSnapshot(ctx context.Context, volumeID, guid string) error
	Grow(ctx context.Context, volumeID string, size int64) error
	Compact(ctx context.Context, volumeID string) error
}

// StageRequest asks Node.Stage to stage a volume. Every field has been
// validated by the driver: ids by package catalog, paths absolute, clean and
// outside the storage root.
type StageRequest struct {
	VolumeID string
	Type     catalog.Type
	// Path is the volume's data (catalog.VolumePath): the stack directory
	// of a ploop volume, the directory of a simfs volume.
	Path        string
	StagingPath string
	// Block stages a ploop volume without a filesystem.
	Block bool
	// FSType is catalog.FSExt4 or catalog.FSXfs (ploop, not Block).
	FSType string
	// MkfsOptions are extra mkfs arguments, used only when the device is
	// blank.
	MkfsOptions []string
	// MountOptions are the staging mount's options.
	MountOptions []string
	// OnlineDiscard mounts with online discard (catalog.DiscardOnline).
	OnlineDiscard bool
	// Transport is what the volume asks to reach the kernel through
	// (AttachNBD, AttachUblk), "" for the node's default (ploop).
	Transport string
}

// PublishRequest asks Node.Publish to publish a staged volume.
type PublishRequest struct {
	VolumeID    string
	StagingPath string
	TargetPath  string
	Block       bool
	ReadOnly    bool
	// SingleWriter (SINGLE_NODE_SINGLE_WRITER) refuses a publish at a
	// second target while the volume is published at another
	// (ErrOtherTarget).
	SingleWriter bool
	// MountOptions apply to the bind mount.
	MountOptions []string
}

// VolumeStats is a staged volume's usage and condition.
type VolumeStats struct {
	// Block volumes report only TotalBytes (the device's size).
	Block                                 bool
	TotalBytes, UsedBytes, AvailableBytes int64
	TotalInodes, UsedInodes, FreeInodes   int64
	Condition                             Condition
}

// Condition is a volume's health: abnormal, with a message a person can act
// on, when its nbd link is dead, its image needs repair, its filesystem
// logged errors or the storage root is nearly full.
type Condition struct {
	Abnormal bool
	Message  string
}

// Error classes of a Node. The adapter of pkg/attachments wraps its own
// classes in these; errors.go maps them to gRPC codes.
var (
	// ErrNodeInvalid: a request the node refuses as malformed
	// (InvalidArgument).
	ErrNodeInvalid = errors.New("invalid node request")
	// ErrNotStaged: the volume is not staged here, or not at that path
	// (NotFound; FailedPrecondition for NodePublishVolume).
	ErrNotStaged = errors.New("volume is not staged here")
	// ErrConflict: the volume is staged or published here with other
	// parameters, or something else is mounted there (AlreadyExists).
	ErrConflict = errors.New("staged or published with other parameters")
	// ErrOtherTarget: a single-writer volume is already published at
	// another target (FailedPrecondition).
	ErrOtherTarget = errors.New("volume is published at another target")
	// ErrInUse: the volume is still published, so it cannot be unstaged
	// (FailedPrecondition).
	ErrInUse = errors.New("volume is still published")
	// ErrNotAttached: this node does not serve the volume; online
	// operations are then run offline by the catalogue (OnlineOf).
	ErrNotAttached = errors.New("volume is not attached here")
	// ErrNodeBusy: another operation on the volume did not finish before
	// the context ended (Aborted).
	ErrNodeBusy = errors.New("another operation on the volume is in progress")
	// ErrVolumeUnavailable: the volume's data cannot be reached (image gone
	// or in need of repair); its condition says why (FailedPrecondition).
	ErrVolumeUnavailable = errors.New("volume is unavailable")
)

// OnlineOf makes a Node the catalogue's catalog.Online: operations on a
// volume this node serves run in the serving process; ErrNotAttached becomes
// catalog.ErrNotAttached, on which the catalogue runs them offline itself.
func OnlineOf(n Node) catalog.Online { return online{n} }

type online struct{ n Node }

var _ catalog.Online = online{}

func (o online) Attached(ctx context.Context, id string) (bool, error) {
	a, err := o.n.Attached(ctx, id)
	return a, onlineErr(err)
}

func (o online) Snapshot(ctx context.Context, id string) (string, error) {
	g, err := o.n.Snapshot(ctx, id)
	return g, onlineErr(err)
}

func (o online) DeleteSnapshot(ctx context.Context, id, guid string) error {
	return onlineErr(o.n.DeleteSnapshot(ctx, id, guid))
}

func (o online) Grow(ctx context.Context, id string, size int64) error {
	return onlineErr(o.n.Grow(ctx, id, size))
}

func (o online) Compact(ctx context.Context, id string) error {
	return onlineErr(o.n.Compact(ctx, id))
}

// onlineErr gives the catalogue the class it acts on. A busy node is the
// catalogue's ErrBusy too, so that the CO retries rather than failing.
func onlineErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrNotAttached) && !errors.Is(err, catalog.ErrNotAttached):
		return fmt.Errorf("%w: %w", catalog.ErrNotAttached, err)
	case errors.Is(err, ErrNodeBusy) && !errors.Is(err, catalog.ErrBusy):
		return fmt.Errorf("%w: %w", catalog.ErrBusy, err)
	}
	return err
}
