package nbd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"k8s.io/klog/v2"
)

// Export is one named block device a Server offers.
type Export struct {
	Name        string
	Description string
	Backend     Backend
	// ReadOnly refuses writes even when the backend accepts them.
	ReadOnly bool
	// OnFailure, if set, is called once when the export fails (see
	// ErrExportFailed), in a goroutine of its own so that it may call
	// Server.Remove.
	OnFailure func(error)
	// OnIOError, if set, is called with every error the Backend returns
	// for a request, and for every request a failed export answers with
	// EIO (the client gets them as NBD errors); it must not block.
	OnIOError func(error)
}

// ErrExportFailed marks an export that stopped serving because a request
// panicked. Every later request to it is answered with EIO: the volume
// behind it is in an unknown state and its owner decides what happens
// next (typically Remove, then reopen or report the volume abnormal).
// Other exports of the same Server are not affected.
var ErrExportFailed = errors.New("nbd: export failed")

// PanicError is the failure of an export whose request handling
// panicked. It wraps ErrExportFailed.
type PanicError struct {
	Export string
	// Value is what was passed to panic.
	Value any
	// Stack is the panicking goroutine's stack.
	Stack []byte
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("nbd: export %q failed: panic: %v", e.Export, e.Value)
}

func (e *PanicError) Unwrap() error { return ErrExportFailed }

func checkExport(e *Export) error {
	if e.Backend == nil {
		return fmt.Errorf("nbd: export %q has no backend", e.Name)
	}
	if len(e.Name) > maxNameLen || len(e.Description) > maxNameLen {
		return fmt.Errorf("nbd: export %q: name or description longer than %d bytes", e.Name, maxNameLen)
	}
	return nil
}

func (e *Export) readOnly() bool { return e.ReadOnly || e.Backend.ReadOnly() }

// transmissionFlags are the flags announced for the export; the kernel
// needs the same value in CONNECT's server flags.
func (e *Export) transmissionFlags() uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagCanMultiConn)
	if e.readOnly() {
		return f | tflagReadOnly
	}
	return f | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
}

// export is an Export while a Server serves it: the connections using
// it, so that Remove can end them, its failure, and the order of its
// writes.
type export struct {
	Export
	srv     *Server
	failure atomic.Pointer[PanicError]
	writes  writeOrder

	mu sync.Mutex
	// users are the connections holding the export: in transmission, or
	// negotiating with it.
	users   map[*conn]struct{}
	removed bool
	// drained is closed once the export is removed and has no users.
	drained chan struct{}
}

// acquire registers c as a user; it fails once the export is removed.
func (e *export) acquire(c *conn) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.removed {
		return false
	}
	e.users[c] = struct{}{}
	return true
}

// release ends c's use of the export: its requests have all finished.
func (e *export) release(c *conn) {
	e.mu.Lock()
	if _, ok := e.users[c]; !ok {
		e.mu.Unlock()
		return
	}
	delete(e.users, c)
	last := e.removed && len(e.users) == 0
	if last {
		close(e.drained)
	}
	e.mu.Unlock()
	if last {
		e.srv.forget(e)
	}
}

// failed returns the export's failure, or nil while it is healthy.
func (e *export) failed() error {
	if p := e.failure.Load(); p != nil {
		return p
	}
	return nil
}

// fail records a panic in the export's request handling: the export
// fails (the first panic is its failure), the stack is logged, and
// OnFailure is told once.
func (e *export) fail(v any, stack []byte) *PanicError {
	p := &PanicError{Export: e.Name, Value: v, Stack: stack}
	klog.ErrorS(nil, "nbd: panic while serving an export; the export now fails every request",
		"export", e.Name, "panic", fmt.Sprint(v), "stack", string(stack))
	if !e.failure.CompareAndSwap(nil, p) {
		return e.failure.Load()
	}
	if e.OnFailure != nil {
		go e.OnFailure(p)
	}
	return p
}

// Add starts serving an export. It fails when the name is taken, also by
// an export that was removed but whose requests are still running.
// The first export added (and not removed) is the default, chosen by
// clients that ask for the empty name.
func (s *Server) Add(exp Export) error {
	if err := checkExport(&exp); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exports[exp.Name] != nil {
		return fmt.Errorf("nbd: export %q exists", exp.Name)
	}
	if s.draining[exp.Name] != nil {
		return fmt.Errorf("nbd: export %q was removed but requests to it are still running", exp.Name)
	}
	e := &export{Export: exp, srv: s, users: map[*conn]struct{}{}, drained: make(chan struct{})}
	s.exports[exp.Name] = e
	s.order = append(s.order, e)
	return nil
}

// Remove stops serving an export: new connections cannot choose it, its
// connections are closed, and Remove waits, until ctx ends, for the
// requests they were running to finish. Afterwards nothing in the server
// touches the export's backend. Removing an unknown export succeeds, so
// Remove is idempotent; after a Remove that ran out of time, another one
// waits again. Kernel devices attached to the export lose their
// connections: disconnect (or Release) them first.
func (s *Server) Remove(ctx context.Context, name string) error {
	s.mu.Lock()
	e := s.exports[name]
	if e != nil {
		delete(s.exports, name)
		for i, o := range s.order {
			if o == e {
				s.order = append(s.order[:i], s.order[i+1:]...)
				break
			}
		}
		s.draining[name] = e
	} else if e = s.draining[name]; e == nil {
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()

	e.mu.Lock()
	if !e.removed {
		e.removed = true
		if len(e.users) == 0 {
			close(e.drained)
		}
	}
	users := make([]*conn, 0, len(e.users))
	for c := range e.users {
		users = append(users, c)
	}
	e.mu.Unlock()
	for _, c := range users {
		c.shutdown()
	}
	select {
	case <-e.drained:
		s.forget(e)
		return nil
	case <-ctx.Done():
		return fmt.Errorf("nbd: remove export %q: requests still running: %w", name, ctx.Err())
	}
}

// forget drops a removed export that has no users left.
func (s *Server) forget(e *export) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining[e.Name] == e {
		delete(s.draining, e.Name)
	}
}

// Failed returns the failure of the named export (an error wrapping
// ErrExportFailed, a *PanicError), or nil when it is healthy or unknown.
func (s *Server) Failed(name string) error {
	s.mu.RLock()
	e := s.exports[name]
	if e == nil {
		e = s.draining[name]
	}
	s.mu.RUnlock()
	if e == nil {
		return nil
	}
	return e.failed()
}

// Exports lists the names of the exports being served, default first.
func (s *Server) Exports() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	names := make([]string, len(s.order))
	for i, e := range s.order {
		names[i] = e.Name
	}
	return names
}

// lookup finds an export by name; "" is the default export.
func (s *Server) lookup(name string) *export {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if name == "" {
		if len(s.order) == 0 {
			return nil
		}
		return s.order[0]
	}
	return s.exports[name]
}

// exportList is a snapshot of the exports, default first, for OPT_LIST.
func (s *Server) exportList() []*export {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return append([]*export(nil), s.order...)
}

// ioError tells the export's owner that its backend failed a request.
func (e *export) ioError(err error) {
	if err != nil && e.OnIOError != nil {
		e.OnIOError(err)
	}
}
