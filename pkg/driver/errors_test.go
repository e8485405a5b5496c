package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// TestErrorMapping: every class of the layers below, wrapped with context
// as they return them, maps to its code; the message is the error's text.
func TestErrorMapping(t *testing.T) {
	wrap := func(class error) error { return fmt.Errorf("create volume %q: stack /r/x: %w", "pvc-1", class) }
	for _, tc := range []struct {
		method string
		err    error
		want   codes.Code
	}{
		{"CreateVolume", wrap(catalog.ErrInvalid), codes.InvalidArgument},
		{"CreateVolume", wrap(catalog.ErrNotFound), codes.NotFound},
		{"CreateVolume", wrap(catalog.ErrExists), codes.AlreadyExists},
		{"CreateVolume", wrap(catalog.ErrOutOfRange), codes.OutOfRange},
		{"CreateVolume", wrap(catalog.ErrNoSpace), codes.ResourceExhausted},
		{"CreateSnapshot", wrap(catalog.ErrLimit), codes.ResourceExhausted},
		{"DeleteVolume", wrap(catalog.ErrInUse), codes.FailedPrecondition},
		{"CreateVolume", wrap(catalog.ErrPrecondition), codes.FailedPrecondition},
		{"DeleteVolume", wrap(catalog.ErrBusy), codes.Aborted},
		{"ListVolumes", wrap(catalog.ErrBadToken), codes.Aborted},
		{"CreateVolume", wrap(catalog.ErrUnavailable), codes.Unavailable},
		{"NodeStageVolume", wrap(ErrNodeInvalid), codes.InvalidArgument},
		{"NodeGetVolumeStats", wrap(ErrNotStaged), codes.NotFound},
		{"NodeExpandVolume", wrap(ErrNotStaged), codes.NotFound},
		{"NodePublishVolume", wrap(ErrNotStaged), codes.FailedPrecondition},
		{"NodeStageVolume", wrap(ErrConflict), codes.AlreadyExists},
		{"NodePublishVolume", wrap(ErrOtherTarget), codes.FailedPrecondition},
		{"NodeUnstageVolume", wrap(ErrInUse), codes.FailedPrecondition},
		{"CreateSnapshot", wrap(ErrNotAttached), codes.FailedPrecondition},
		{"NodeStageVolume", wrap(ErrNodeBusy), codes.Aborted},
		{"NodeStageVolume", wrap(ErrVolumeUnavailable), codes.FailedPrecondition},
		{"NodeStageVolume", wrap(context.DeadlineExceeded), codes.DeadlineExceeded},
		{"NodeStageVolume", wrap(context.Canceled), codes.Canceled},
		{"NodeStageVolume", wrap(&os.PathError{Op: "write", Path: "/r/x", Err: unix.ENOSPC}), codes.ResourceExhausted},
		{"NodeStageVolume", wrap(unix.EDQUOT), codes.ResourceExhausted},
		{"NodeStageVolume", wrap(&os.PathError{Op: "open", Path: "/r", Err: unix.EROFS}), codes.Unavailable},
		{"NodeStageVolume", wrap(unix.ETIMEDOUT), codes.DeadlineExceeded},
		{"NodeStageVolume", wrap(&os.PathError{Op: "open", Path: "/r/x", Err: unix.ENOENT}), codes.NotFound},
		{"NodeStageVolume", wrap(fs.ErrPermission), codes.FailedPrecondition},
		{"NodeStageVolume", wrap(unix.EBUSY), codes.FailedPrecondition},
		{"NodeStageVolume", errors.New("mkfs.ext4 exited with status 1"), codes.Internal},
		{"NodeStageVolume", wrap(unix.EIO), codes.Internal},
		// A class says more than a system error underneath it.
		{"CreateVolume", fmt.Errorf("%w: %w", catalog.ErrNoSpace, unix.ENOENT), codes.ResourceExhausted},
		{"DeleteVolume", fmt.Errorf("%w: %w", catalog.ErrBusy, context.DeadlineExceeded), codes.Aborted},
		// A status set on purpose is kept.
		{"Probe", fmt.Errorf("probe: %w", status.Error(codes.FailedPrecondition, "root full")), codes.FailedPrecondition},
	} {
		err := toStatus(tc.method, tc.err)
		s, ok := status.FromError(err)
		if !ok || s.Code() != tc.want {
			t.Errorf("%s %v: %v, want %v", tc.method, tc.err, err, tc.want)
			continue
		}
		if !strings.Contains(s.Message(), tc.err.Error()) && tc.method != "Probe" {
			t.Errorf("%s %v: message %q lost the error's text", tc.method, tc.err, s.Message())
		}
	}
	if toStatus("CreateVolume", nil) != nil {
		t.Error("nil error mapped to a status")
	}
}

// TestErrorsThroughRPC: the mapping happens on the wire for the node's
// errors too (the fake returns each class).
func TestErrorsThroughRPC(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	v := e.create(t, "v", mib, nil)
	stage := func() error {
		_, err := e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(),
			StagingTargetPath: e.kdir + "/s", VolumeCapability: mountCap(snw, "")})
		return err
	}
	for class, want := range map[error]codes.Code{
		ErrConflict: codes.AlreadyExists, ErrNodeBusy: codes.Aborted, ErrVolumeUnavailable: codes.FailedPrecondition,
		context.DeadlineExceeded: codes.DeadlineExceeded, errors.New("nbd: no free device"): codes.Internal,
	} {
		e.node.hook = func(op string) error { return fmt.Errorf("stage %s: %w", v.GetVolumeId(), class) }
		wantCode(t, class.Error(), stage(), want, class.Error())
	}
}

// TestProbe: ready while the root is usable, FailedPrecondition with the
// reason when it is missing or broken.
func TestProbe(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	r, err := e.id.Probe(ctx, &csi.ProbeRequest{})
	if err != nil || !r.GetReady().GetValue() {
		t.Fatalf("probe: %v %v", r, err)
	}
	// One of the catalogue's directories replaced by a file.
	recs := filepath.Join(e.root, "catalog", "snapshots")
	if err := os.Rename(recs, recs+".away"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(recs, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = e.id.Probe(ctx, &csi.ProbeRequest{})
	wantCode(t, "probe of a broken root", err, codes.FailedPrecondition, "not a directory")
	os.Remove(recs)
	os.Rename(recs+".away", recs)
	// The whole root gone.
	if err := os.Rename(e.root, e.root+".away"); err != nil {
		t.Fatal(err)
	}
	_, err = e.id.Probe(ctx, &csi.ProbeRequest{})
	wantCode(t, "probe of a missing root", err, codes.FailedPrecondition, "does not exist")
	if err := os.Rename(e.root+".away", e.root); err != nil {
		t.Fatal(err)
	}
	if _, err := e.id.Probe(ctx, &csi.ProbeRequest{}); err != nil {
		t.Fatalf("probe after the root came back: %v", err)
	}
}
