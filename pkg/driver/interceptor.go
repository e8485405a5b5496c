package driver

import (
	"context"
	"fmt"
	"runtime/debug"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// intercept wraps every CSI call: it turns a panic into Internal (one bad
// call must not take the node's volumes down with the process), maps the
// handler's error to a gRPC code (toStatus, the only place that does), and
// logs the call once: method, ids, duration and code at V(2); failures the
// caller must fix at V(1), failures of the driver or the node as errors.
func (d *Driver) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
	start := time.Now()
	defer func() {
		if p := recover(); p != nil {
			d.log.Error(fmt.Errorf("panic: %v", p), "a CSI call panicked; the call fails, the driver goes on",
				"method", method, "stack", string(debug.Stack()))
			resp, err = nil, status.Errorf(codes.Internal, "%s: internal error (panic: %v); the driver's log has the stack", method, p)
		}
		code, took := status.Code(err), time.Since(start)
		if d.cfg.Observer != nil {
			d.cfg.Observer.ObserveCall(method, code, took)
		}
		kv := append(requestIDs(req), "duration", took, "code", code.String())
		switch {
		case err == nil:
			d.log.V(2).Info("CSI call", append([]any{"method", method}, kv...)...)
		case callerError(code):
			d.log.V(1).Info("CSI call failed", append([]any{"method", method, "err", logString(status.Convert(err).Message())}, kv...)...)
		default:
			d.log.Error(err, "CSI call failed", append([]any{"method", method}, kv...)...)
		}
	}()
	resp, err = handler(ctx, req)
	if err != nil {
		return nil, toStatus(method, err)
	}
	return resp, nil
}

// callerError reports whether a code says the request or the state of the
// volume is at fault (the CO retries or fixes it), not the driver.
func callerError(c codes.Code) bool {
	switch c {
	case codes.InvalidArgument, codes.NotFound, codes.AlreadyExists, codes.FailedPrecondition,
		codes.OutOfRange, codes.ResourceExhausted, codes.Aborted, codes.Canceled, codes.Unimplemented:
		return true
	}
	return false
}

// requestIDs returns the ids and names a request carries, as log key-value
// pairs: volume, source volume, snapshot, name.
func requestIDs(req any) []any {
	var kv []any
	if r, ok := req.(interface{ GetVolumeId() string }); ok && r.GetVolumeId() != "" {
		kv = append(kv, "volume", logString(r.GetVolumeId()))
	}
	if r, ok := req.(interface{ GetSourceVolumeId() string }); ok && r.GetSourceVolumeId() != "" {
		kv = append(kv, "sourceVolume", logString(r.GetSourceVolumeId()))
	}
	if r, ok := req.(interface{ GetSnapshotId() string }); ok && r.GetSnapshotId() != "" {
		kv = append(kv, "snapshot", logString(r.GetSnapshotId()))
	}
	if r, ok := req.(interface{ GetName() string }); ok && r.GetName() != "" {
		kv = append(kv, "name", logString(r.GetName()))
	}
	return kv
}

// maxLogString bounds what a request can put into one log line.
const maxLogString = 512

// logString is s as it goes into the log: a hostile id (4 KiB, control
// bytes) is cut and quoted rather than written as it is.
func logString(s string) string {
	cut := ""
	if len(s) > maxLogString {
		cut = fmt.Sprintf("...(%d bytes)", len(s))
		s = s[:maxLogString]
	}
	if !printable(strings.ReplaceAll(s, " ", "_")) {
		return fmt.Sprintf("%q%s", s, cut)
	}
	return s + cut
}
