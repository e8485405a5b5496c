package catalog

import "errors"

// Error classes. Every error the catalogue returns because of the request or
// the state of the root wraps one of these, so that the CSI layer maps them
// to gRPC codes in one place; the text around it says what to do.
var (
	// ErrInvalid: a malformed request or id (InvalidArgument).
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: no such volume or snapshot (NotFound).
	ErrNotFound = errors.New("not found")
	// ErrExists: the name is taken by an object with other parameters
	// (AlreadyExists).
	ErrExists = errors.New("already exists with different parameters")
	// ErrOutOfRange: a size outside what the request's limit or the type
	// allows (OutOfRange).
	ErrOutOfRange = errors.New("size out of range")
	// ErrNoSpace: the storage root cannot promise the capacity
	// (ResourceExhausted), so a scheduler can pick another node.
	ErrNoSpace = errors.New("not enough capacity in the storage root")
	// ErrLimit: a per-volume limit is reached, e.g. the ploop chain limit of
	// 127 deltas (ResourceExhausted).
	ErrLimit = errors.New("limit reached")
	// ErrInUse: the volume is attached or served by a process, so the
	// operation cannot run now (FailedPrecondition).
	ErrInUse = errors.New("in use")
	// ErrPrecondition: the root cannot do this at all in its current state,
	// e.g. simfs on a filesystem without project quota (FailedPrecondition).
	ErrPrecondition = errors.New("precondition failed")
	// ErrBusy: another operation on the same name, volume or snapshot is in
	// progress and the context ended while waiting for it (Aborted).
	ErrBusy = errors.New("another operation is in progress")
	// ErrBadToken: a list token this catalogue did not issue (Aborted).
	ErrBadToken = errors.New("invalid list token")
	// ErrUnavailable: the storage root or the node that serves the volume
	// cannot be reached or used now; a retry may succeed (Unavailable).
	ErrUnavailable = errors.New("unavailable")
)

// ErrHeld is Open's error (besides ErrUnavailable) when another process
// has the root's catalogue open; that process may be about to stop.
var ErrHeld = errors.New("its catalogue is open in another process")

// ErrNotAttached is what an Online implementation returns when it does not
// serve the volume; the catalogue then runs the operation offline itself.
var ErrNotAttached = errors.New("volume is not attached")

// classes names the error classes for a record that outlives the process,
// such as a custom resource's status: the node writes ClassOf, the
// controller reads it back with FromClass and maps it as if the catalogue
// had returned it.
var classes = []struct {
	name string
	err  error
}{
	{"Invalid", ErrInvalid}, {"NotFound", ErrNotFound}, {"Exists", ErrExists}, {"OutOfRange", ErrOutOfRange},
	{"NoSpace", ErrNoSpace}, {"Limit", ErrLimit}, {"InUse", ErrInUse}, {"Precondition", ErrPrecondition},
	{"Busy", ErrBusy}, {"BadToken", ErrBadToken}, {"Unavailable", ErrUnavailable},
	{"NotAttached", ErrNotAttached},
}

// ClassOf names err's class, "" for an error of none (an internal error).
func ClassOf(err error) string {
	for _, c := range classes {
		if errors.Is(err, c.err) {
			return c.name
		}
	}
	return ""
}

// Permanent reports whether retrying the same request cannot cure err: the
// request itself is wrong for this root (invalid, taken, out of range, no
// capacity, a limit).
func Permanent(err error) bool {
	for _, class := range []error{ErrInvalid, ErrExists, ErrOutOfRange, ErrNoSpace, ErrLimit, ErrPrecondition} {
		if errors.Is(err, class) {
			return true
		}
	}
	return false
}

// FromClass is an error with message msg of the class ClassOf named; an
// unknown or empty class gives an error of no class.
func FromClass(class, msg string) error {
	for _, c := range classes {
		if c.name == class {
			return &classError{msg: msg, class: c.err}
		}
	}
	return errors.New(msg)
}

type classError struct {
	msg   string
	class error
}

func (e *classError) Error() string { return e.msg }
func (e *classError) Unwrap() error { return e.class }
