package driver

import (
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
)

// TestCallLogging: each call is logged exactly once, with the method, the
// ids it names, the duration and the code; successes at V(2), failures the
// caller must fix at V(1), failures of the driver as errors.
func TestCallLogging(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	v := e.create(t, "logged", mib, nil)
	id := v.GetVolumeId()
	if _, err := e.ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	_, err := e.ctl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: "../x"})
	wantCode(t, "hostile", err, codes.InvalidArgument, "")
	e.node.hook = func(string) error { return errUnclassified }
	_, err = e.nd.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: e.kdir + "/s", VolumeCapability: mountCap(snw, "")})
	wantCode(t, "node failure", err, codes.Internal, "")
	_, err = e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: strings.Repeat("\x01", 5000), VolumeCapabilities: []*csi.VolumeCapability{mountCap(snw, "")}})
	wantCode(t, "long name", err, codes.InvalidArgument, "")

	calls := e.logs.matching("CSI call")
	if len(calls) != 5 {
		t.Fatalf("%d call lines for 5 calls:\n%s", len(calls), strings.Join(calls, "\n"))
	}
	for i, want := range []struct{ method, level, code, id string }{
		{"CreateVolume", `"level"=2`, "OK", `"name"="logged"`},
		{"ControllerGetVolume", `"level"=2`, "OK", `"volume"="` + id + `"`},
		{"ControllerGetVolume", `"level"=1`, "InvalidArgument", `"volume"="../x"`},
		{"NodeStageVolume", `"error"=`, "Internal", `"volume"="` + id + `"`},
		{"CreateVolume", `"level"=1`, "InvalidArgument", `...(5000 bytes)`},
	} {
		l := calls[i]
		for _, s := range []string{`"method"="` + want.method + `"`, want.level, `"code"="` + want.code + `"`, want.id, `"duration"=`} {
			if !strings.Contains(l, s) {
				t.Errorf("line %d %q lacks %s", i, l, s)
			}
		}
	}
	if len(calls[4]) > 4096 {
		t.Errorf("a 5000-byte name made a %d-byte log line", len(calls[4]))
	}
}

var errUnclassified = errorString("nbd: no free device")

type errorString string

func (e errorString) Error() string { return string(e) }

// TestPanicRecovery: a panic in one call is that call's Internal error; the
// driver goes on serving, the same call included.
func TestPanicRecovery(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := ctxT(t)
	v := e.create(t, "v", mib, nil)
	staging := e.kdir + "/s"
	e.node.hook = func(op string) error {
		if op == "Stage" {
			panic("index out of range in the attach path")
		}
		return nil
	}
	req := &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: staging, VolumeCapability: mountCap(snw, "")}
	_, err := e.nd.NodeStageVolume(ctx, req)
	wantCode(t, "panicking stage", err, codes.Internal, "panic")
	if lines := e.logs.matching("panicked"); len(lines) != 1 || !strings.Contains(lines[0], "goroutine") {
		t.Errorf("panic log: %v", lines)
	}
	e.node.hook = nil
	if _, err := e.nd.NodeStageVolume(ctx, req); err != nil {
		t.Fatalf("stage after a panic: %v", err)
	}
	if _, err := e.id.Probe(ctx, &csi.ProbeRequest{}); err != nil {
		t.Fatalf("probe after a panic: %v", err)
	}
}
