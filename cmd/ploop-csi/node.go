package main

import (
	"context"
	"fmt"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
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
}

// attachments is the node's attachments as main owns them.
type attachments interface {
	driver.Node
	// Close stops serving without detaching anything: the kernel holds the
	// devices' I/O until the next process reattaches them.
	Close() error
}

// newNodeFunc makes the node's attachments. It returns once their restart
// recovery is complete: volumes attached before a restart are served again
// before the driver answers any call.
type newNodeFunc func(ctx context.Context, cfg nodeConfig) (attachments, error)

// newAttachments is the node's attachments of this build. pkg/attachments
// (the Manager that serves stacks to kernel nbd devices) is being written
// alongside the driver; until it is wired in here (attachments.New plus the
// adapter to driver.Node), node calls fail with a clear message and the
// controller side works on its own: nothing is ever attached, so the
// catalogue runs every operation offline.
func newAttachments(ctx context.Context, cfg nodeConfig) (attachments, error) {
	return unwired{}, nil
}

// unwired is the placeholder for the node's attachments.
type unwired struct{}

func errUnwired(op string) error {
	return fmt.Errorf("%s: this build of ploop-csi has no node attachments yet (pkg/attachments is not wired into cmd/ploop-csi), "+
		"so volumes cannot be staged or published on this node: %w", op, catalog.ErrPrecondition)
}

func (unwired) Stage(ctx context.Context, req driver.StageRequest) error { return errUnwired("stage") }

// Unstage and Unpublish succeed: this build never staged or published
// anything, and a CO's clean-up must not get stuck on it.
func (unwired) Unstage(ctx context.Context, id, path string) error { return nil }
func (unwired) Publish(ctx context.Context, req driver.PublishRequest) error {
	return errUnwired("publish")
}
func (unwired) Unpublish(ctx context.Context, id, path string) error { return nil }
func (unwired) Expand(ctx context.Context, id string, size int64, path string) (int64, error) {
	return 0, errUnwired("expand")
}
func (unwired) Stats(ctx context.Context, id, path string) (driver.VolumeStats, error) {
	return driver.VolumeStats{}, errUnwired("stats")
}
func (unwired) MaxVolumes() int                                       { return 0 }
func (unwired) Attached(ctx context.Context, id string) (bool, error) { return false, nil }
func (unwired) Snapshot(ctx context.Context, id string) (string, error) {
	return "", driver.ErrNotAttached
}
func (unwired) DeleteSnapshot(ctx context.Context, id, guid string) error {
	return driver.ErrNotAttached
}
func (unwired) Grow(ctx context.Context, id string, size int64) error { return driver.ErrNotAttached }
func (unwired) Compact(ctx context.Context, id string) error          { return driver.ErrNotAttached }
func (unwired) Close() error                                          { return nil }
