package attachments

import "errors"

// Error classes. Every error the Manager returns because of the request or
// of the node's state wraps one of these, so the CSI layer can map them to
// gRPC codes in one place; other errors are failures of the node
// (Internal).
var (
	// ErrInvalid: a malformed id, path, size or option (InvalidArgument).
	ErrInvalid = errors.New("invalid argument")
	// ErrNotStaged: the volume is not staged on this node, or not at the
	// staging path given (NotFound for stats and expansion,
	// FailedPrecondition for publish).
	ErrNotStaged = errors.New("volume is not staged here")
	// ErrConflict: the volume is staged or published here with other
	// parameters, or something else is mounted where it should go
	// (AlreadyExists).
	ErrConflict = errors.New("staged or published with other parameters")
	// ErrOtherTarget: a single-writer publish while the volume is
	// published at another target (FailedPrecondition: the CO must
	// unpublish the other first).
	ErrOtherTarget = errors.New("volume is published at another target")
	// ErrInUse: the volume is still published, so it cannot be unstaged
	// (FailedPrecondition).
	ErrInUse = errors.New("volume is still in use")
	// ErrNotAttached: the volume is not attached (served) by this node,
	// so an online operation cannot run here; the catalogue runs the
	// offline operation instead.
	ErrNotAttached = errors.New("volume is not attached")
	// ErrBusy: another operation on the volume did not finish before the
	// context ended (Aborted).
	ErrBusy = errors.New("another operation on the volume is in progress")
	// ErrServedElsewhere: another process holds the volume's stack (its
	// directory's lock): on a shared storage root, another node serves
	// the volume until it unstages it (Aborted, like ErrBusy, so that the
	// CO retries).
	ErrServedElsewhere = errors.New("the volume is served by another process")
	// ErrUnavailable: the volume's data cannot be reached (its image is
	// gone or needs repair); its condition says why (FailedPrecondition).
	ErrUnavailable = errors.New("volume is unavailable")
)
