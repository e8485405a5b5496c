package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/attachments"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
	"github.com/ploop-csi/ploop-csi/pkg/simfs"
)

// nodeConfig is what the node's attachments are made from (the flags).
type nodeConfig struct {
	StorageRoot string
	NodeID      string
	// KubeletDir, when set, is the only directory below which staging and
	// target paths are accepted.
	KubeletDir      string
	TrimInterval    time.Duration
	NBDConnections  int
	NBDTimeout      time.Duration
	DeadConnTimeout time.Duration
	// DirectIO opens images with O_DIRECT.
	DirectIO bool
	// Attach is the default transport of ploop volumes; UblkQueues shapes
	// ublk devices.
	Attach     attachments.Transport
	UblkQueues int
	// Dirs is the storage root's simfs root, shared with the catalogue;
	// nil refuses simfs volumes.
	Dirs *simfs.Root
	// Observer, when set, counts the volumes' I/O errors, re-attaches and
	// online pauses (metrics).
	Observer attachments.Observer
}

// nodeAttachments is the node's attachments as main owns them.
type nodeAttachments interface {
	driver.Node
	// Close stops serving without detaching anything: the kernel holds the
	// devices' I/O until the next process reattaches them.
	Close() error
}

// newNodeFunc makes the node's attachments. It returns once their restart
// recovery is complete: volumes attached before a restart are served again
// before the driver answers any call.
type newNodeFunc func(ctx context.Context, cfg nodeConfig) (nodeAttachments, error)

// newAttachments is the node's attachments of this build: an
// attachments.Manager, whose New recovers what the node had attached
// before it returns.
func newAttachments(ctx context.Context, cfg nodeConfig) (nodeAttachments, error) {
	o := attachments.Options{
		StorageRoot: cfg.StorageRoot,
		NodeID:      cfg.NodeID,
		Attach: attachments.AttachOptions{
			Connections: cfg.NBDConnections, Timeout: cfg.NBDTimeout, DeadConnTimeout: cfg.DeadConnTimeout,
			Transport: cfg.Attach, UblkQueues: cfg.UblkQueues,
		},
		Direct:       cfg.DirectIO,
		TrimInterval: cfg.TrimInterval,
		Observer:     cfg.Observer,
	}
	if cfg.KubeletDir != "" {
		o.PathPrefixes = []string{cfg.KubeletDir}
	}
	if cfg.Dirs != nil {
		o.Dirs = cfg.Dirs // never a nil *simfs.Root in the interface
	}
	m, err := attachments.New(ctx, o)
	if err != nil {
		return nil, nodeErr(err)
	}
	return node{m}, nil
}

// node adapts an attachments.Manager to driver.Node: the request and
// result structs are converted field by field, and errors get the driver's
// classes (nodeErr). The online operations are the Manager's, with their
// errors classified the same way.
type node struct{ *attachments.Manager }

var _ nodeAttachments = node{}

func (n node) Stage(ctx context.Context, r driver.StageRequest) error {
	return nodeErr(n.Manager.Stage(ctx, attachments.StageRequest{
		VolumeID: r.VolumeID, Kind: attachments.Kind(r.Type), Path: r.Path, StagingPath: r.StagingPath,
		Block: r.Block, FSType: r.FSType, MkfsOptions: r.MkfsOptions, MountOptions: r.MountOptions,
		OnlineDiscard: r.OnlineDiscard, Transport: attachments.Transport(r.Transport),
	}))
}

func (n node) Unstage(ctx context.Context, id, stagingPath string) error {
	return nodeErr(n.Manager.Unstage(ctx, id, stagingPath))
}

func (n node) Publish(ctx context.Context, r driver.PublishRequest) error {
	return nodeErr(n.Manager.Publish(ctx, attachments.PublishRequest{
		VolumeID: r.VolumeID, StagingPath: r.StagingPath, TargetPath: r.TargetPath, Block: r.Block,
		ReadOnly: r.ReadOnly, SingleWriter: r.SingleWriter, MountOptions: r.MountOptions,
	}))
}

func (n node) Unpublish(ctx context.Context, id, targetPath string) error {
	return nodeErr(n.Manager.Unpublish(ctx, id, targetPath))
}

func (n node) Expand(ctx context.Context, id string, size int64, volumePath string) (int64, error) {
	got, err := n.Manager.Expand(ctx, id, size, volumePath)
	return got, nodeErr(err)
}

func (n node) Stats(ctx context.Context, id, volumePath string) (driver.VolumeStats, error) {
	st, err := n.Manager.Stats(ctx, id, volumePath)
	if err != nil {
		return driver.VolumeStats{}, nodeErr(err)
	}
	return driver.VolumeStats{
		Block:      st.Block,
		TotalBytes: st.TotalBytes, UsedBytes: st.UsedBytes, AvailableBytes: st.AvailableBytes,
		TotalInodes: st.TotalInodes, UsedInodes: st.UsedInodes, FreeInodes: st.FreeInodes,
		Condition: driver.Condition{Abnormal: st.Condition.Abnormal, Message: st.Condition.Message},
	}, nil
}

func (n node) Attached(ctx context.Context, id string) (bool, error) {
	a, err := n.Manager.Attached(ctx, id)
	return a, nodeErr(err)
}

func (n node) Snapshot(ctx context.Context, id string) (string, error) {
	g, err := n.Manager.Snapshot(ctx, id)
	return g, nodeErr(err)
}

func (n node) DeleteSnapshot(ctx context.Context, id, guid string) error {
	return nodeErr(n.Manager.DeleteSnapshot(ctx, id, guid))
}

func (n node) Grow(ctx context.Context, id string, size int64) error {
	return nodeErr(n.Manager.Grow(ctx, id, size))
}

func (n node) Compact(ctx context.Context, id string) error {
	return nodeErr(n.Manager.Compact(ctx, id))
}

// errorPairs maps the error classes of pkg/attachments to the driver's
// node classes, which pkg/driver maps to gRPC codes.
var errorPairs = [...]struct{ from, to error }{
	{attachments.ErrInvalid, driver.ErrNodeInvalid},
	{attachments.ErrNotStaged, driver.ErrNotStaged},
	{attachments.ErrConflict, driver.ErrConflict},
	{attachments.ErrOtherTarget, driver.ErrOtherTarget},
	{attachments.ErrInUse, driver.ErrInUse},
	{attachments.ErrNotAttached, driver.ErrNotAttached},
	{attachments.ErrBusy, driver.ErrNodeBusy},
	{attachments.ErrServedElsewhere, driver.ErrNodeBusy},
	{attachments.ErrUnavailable, driver.ErrVolumeUnavailable},
}

// nodeErr adds the driver's class to an error of the Manager, keeping the
// error (and what it wraps) for errors.Is. Errors of no class (a failure
// of the node) stay as they are: Internal, or the code of the system
// error they wrap.
func nodeErr(err error) error {
	if err == nil {
		return nil
	}
	for _, p := range errorPairs {
		if errors.Is(err, p.from) {
			return fmt.Errorf("%w: %w", p.to, err)
		}
	}
	return err
}
