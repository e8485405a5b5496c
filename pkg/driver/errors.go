package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// errorClass is one row of the table that turns the errors of the layers
// below into gRPC codes. Handlers return plain Go errors wrapping these
// classes; the interceptor maps them, here and nowhere else.
type errorClass struct {
	class error
	code  codes.Code
	// byMethod overrides code for some methods (short names).
	byMethod map[string]codes.Code
}

// errorTable is checked in order, so an error wrapping several classes gets
// the first: the classes of package catalog and of the Node (which say what
// the request or the state is) before context errors (which only say that
// time ran out) before raw system errors.
var errorTable = []errorClass{
	// The catalogue (pkg/catalog/errors.go), also used by the driver's own
	// request checks.
	{class: catalog.ErrInvalid, code: codes.InvalidArgument},
	{class: catalog.ErrNotFound, code: codes.NotFound},
	{class: catalog.ErrExists, code: codes.AlreadyExists},
	{class: catalog.ErrOutOfRange, code: codes.OutOfRange},
	{class: catalog.ErrNoSpace, code: codes.ResourceExhausted},
	{class: catalog.ErrLimit, code: codes.ResourceExhausted},
	{class: catalog.ErrInUse, code: codes.FailedPrecondition},
	{class: catalog.ErrPrecondition, code: codes.FailedPrecondition},
	{class: catalog.ErrBusy, code: codes.Aborted},
	{class: catalog.ErrBadToken, code: codes.Aborted},
	{class: catalog.ErrUnavailable, code: codes.Unavailable},
	{class: catalog.ErrNotAttached, code: codes.FailedPrecondition},

	// The node's attachments (node.go).
	{class: ErrNodeInvalid, code: codes.InvalidArgument},
	{class: ErrNotStaged, code: codes.NotFound, byMethod: map[string]codes.Code{
		// The spec's "Exceeds capabilities"/staging not done: the CO must
		// stage first, not look for another volume.
		"NodePublishVolume": codes.FailedPrecondition,
	}},
	{class: ErrConflict, code: codes.AlreadyExists},
	{class: ErrOtherTarget, code: codes.FailedPrecondition},
	{class: ErrInUse, code: codes.FailedPrecondition},
	{class: ErrNotAttached, code: codes.FailedPrecondition},
	{class: ErrNodeBusy, code: codes.Aborted},
	{class: ErrVolumeUnavailable, code: codes.FailedPrecondition},

	// Time ran out: the CO retries.
	{class: context.DeadlineExceeded, code: codes.DeadlineExceeded},
	{class: context.Canceled, code: codes.Canceled},

	// System errors that reached the driver unclassified.
	{class: unix.ENOSPC, code: codes.ResourceExhausted},
	{class: unix.EDQUOT, code: codes.ResourceExhausted},
	{class: unix.EROFS, code: codes.Unavailable},
	{class: unix.ETIMEDOUT, code: codes.DeadlineExceeded},
	{class: fs.ErrNotExist, code: codes.NotFound},
	// Missing privileges or a busy mount are the node's state, not the
	// caller's identity (PermissionDenied is about secrets in CSI).
	{class: fs.ErrPermission, code: codes.FailedPrecondition},
	{class: unix.EBUSY, code: codes.FailedPrecondition},
}

// toStatus maps an error of a handler of method (its short name, e.g.
// "CreateVolume") to a gRPC status error. An error that already carries a
// status keeps it; an error of no known class is Internal. The message is
// the error's text, which the layers below write for a person to act on.
func toStatus(method string, err error) error {
	if err == nil {
		return nil
	}
	if s, ok := status.FromError(err); ok {
		return s.Err()
	}
	return status.Error(codeOf(method, err), boundMessage(err.Error()))
}

// maxMessage bounds a status message: errors quote what the request
// carried, and a hostile request must not make the CO store megabytes.
const maxMessage = 2048

func boundMessage(s string) string {
	if len(s) <= maxMessage {
		return s
	}
	return fmt.Sprintf("%s...(%d bytes)", s[:maxMessage], len(s))
}

// codeOf is the code toStatus gives err.
func codeOf(method string, err error) codes.Code {
	for _, row := range errorTable {
		if errors.Is(err, row.class) {
			if c, ok := row.byMethod[method]; ok {
				return c
			}
			return row.code
		}
	}
	return codes.Internal
}
