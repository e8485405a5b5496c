package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/attachments"
	"github.com/ploop-csi/ploop-csi/pkg/driver"
)

// TestNodeErrorPairs: every class of pkg/attachments becomes its driver
// class (and so its gRPC code), the original staying visible; an error of
// no class is left alone.
func TestNodeErrorPairs(t *testing.T) {
	for _, tc := range []struct{ from, to error }{
		{attachments.ErrInvalid, driver.ErrNodeInvalid},
		{attachments.ErrNotStaged, driver.ErrNotStaged},
		{attachments.ErrConflict, driver.ErrConflict},
		{attachments.ErrOtherTarget, driver.ErrOtherTarget},
		{attachments.ErrInUse, driver.ErrInUse},
		{attachments.ErrNotAttached, driver.ErrNotAttached},
		{attachments.ErrBusy, driver.ErrNodeBusy},
		{attachments.ErrUnavailable, driver.ErrVolumeUnavailable},
	} {
		err := nodeErr(fmt.Errorf("stage x: %w", tc.from))
		if !errors.Is(err, tc.to) || !errors.Is(err, tc.from) {
			t.Errorf("%v became %v, want it to wrap %v", tc.from, err, tc.to)
		}
	}
	plain := errors.New("mkfs failed")
	if err := nodeErr(plain); err != plain {
		t.Errorf("unclassified error became %v", err)
	}
	if nodeErr(nil) != nil {
		t.Error("nil became an error")
	}
}

// TestNodeStructs: the adapter converts the driver's structs field for
// field, so a field added to one side and not the other is caught here.
func TestNodeStructs(t *testing.T) {
	for _, tc := range []struct {
		driver, attachments any
		renamed             map[string]string
	}{
		{driver.StageRequest{}, attachments.StageRequest{}, map[string]string{"Type": "Kind"}},
		{driver.PublishRequest{}, attachments.PublishRequest{}, nil},
		{driver.VolumeStats{}, attachments.VolumeStats{}, nil},
		{driver.Condition{}, attachments.Condition{}, nil},
	} {
		d, a := reflect.TypeOf(tc.driver), reflect.TypeOf(tc.attachments)
		if d.NumField() != a.NumField() {
			t.Errorf("%v has %d fields, %v %d", d, d.NumField(), a, a.NumField())
		}
		for i := range d.NumField() {
			name := d.Field(i).Name
			if r, ok := tc.renamed[name]; ok {
				name = r
			}
			if _, ok := a.FieldByName(name); !ok {
				t.Errorf("%v.%s has no counterpart in %v", d, d.Field(i).Name, a)
			}
		}
	}
}

// TestNodeAdapter: the real attachments on this host (no nbd, no quota)
// behind the driver's interface: requests reach the Manager and its
// refusals come back in the driver's classes.
func TestNodeAdapter(t *testing.T) {
	root, kubelet := t.TempDir(), t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n, err := newAttachments(ctx, nodeConfig{StorageRoot: root, NodeID: "node-1", KubeletDir: kubelet})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	staging := filepath.Join(kubelet, "staging")
	if err := os.Mkdir(filepath.Join(root, "simfs-a"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		want error
	}{
		{"stage with a hostile id", n.Stage(ctx, driver.StageRequest{VolumeID: "../x", Type: "ploop", Path: filepath.Join(root, "x"), StagingPath: staging}), driver.ErrNodeInvalid},
		{"stage outside the kubelet dir", n.Stage(ctx, driver.StageRequest{VolumeID: "ploop-a", Type: "ploop", Path: filepath.Join(root, "ploop-a"), StagingPath: "/mnt/x"}), driver.ErrNodeInvalid},
		{"simfs without a simfs root", n.Stage(ctx, driver.StageRequest{VolumeID: "simfs-a", Type: "simfs", Path: filepath.Join(root, "simfs-a"), StagingPath: staging}), driver.ErrNodeInvalid},
		{"publish unstaged", n.Publish(ctx, driver.PublishRequest{VolumeID: "ploop-a", StagingPath: staging, TargetPath: filepath.Join(kubelet, "t")}), driver.ErrNotStaged},
		{"stats unstaged", func() error { _, err := n.Stats(ctx, "ploop-a", staging); return err }(), driver.ErrNotStaged},
		{"expand unstaged", func() error { _, err := n.Expand(ctx, "ploop-a", 1<<20, staging); return err }(), driver.ErrNotStaged},
		{"snapshot of a volume not attached", func() error { _, err := n.Snapshot(ctx, "ploop-a"); return err }(), driver.ErrNotAttached},
		{"grow of a volume not attached", n.Grow(ctx, "ploop-a", 1<<20), driver.ErrNotAttached},
	} {
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, tc.err, tc.want)
		}
	}
	if err := n.Unpublish(ctx, "ploop-a", filepath.Join(kubelet, "gone")); err != nil {
		t.Errorf("unpublish of a target that is gone: %v", err)
	}
	if err := n.Unstage(ctx, "ploop-a", staging); err != nil {
		t.Errorf("unstage of a volume not staged: %v", err)
	}
	if a, err := n.Attached(ctx, "ploop-a"); a || err != nil {
		t.Errorf("attached: %v, %v", a, err)
	}
}
