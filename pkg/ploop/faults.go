package ploop

import "os"

// faultFunc, when set in the unexported options fields by a test, is asked
// before each storage call of the files it covers: op is "open", "read",
// "write", "sync", "punch", "zero" or "truncate", path the file; online
// operations also ask it with "rename" before switching the descriptor. A non-nil
// error fails the call with it. It exists so that tests can fail one chosen
// step of an online operation and prove that one broken volume stays
// contained; nothing outside tests sets it.
type faultFunc func(op, path string) error

// wrap returns s, or s behind the fault checks when f is set; the "open"
// check runs here.
func (f faultFunc) wrap(s storage, path string) (storage, error) {
	if f == nil {
		return s, nil
	}
	if err := f("open", path); err != nil {
		s.Close()
		return nil, err
	}
	return &faultyStorage{storage: s, path: path, fail: f}, nil
}

type faultyStorage struct {
	storage
	path string
	fail faultFunc
}

// ioFile refuses: I/O a server does on the file itself would miss the
// faults.
func (*faultyStorage) ioFile([]byte, int64) *os.File { return nil }

func (s *faultyStorage) ReadAt(p []byte, off int64) (int, error) {
	if err := s.fail("read", s.path); err != nil {
		return 0, err
	}
	return s.storage.ReadAt(p, off)
}

func (s *faultyStorage) WriteAt(p []byte, off int64) (int, error) {
	if err := s.fail("write", s.path); err != nil {
		return 0, err
	}
	return s.storage.WriteAt(p, off)
}

func (s *faultyStorage) Sync() error {
	if err := s.fail("sync", s.path); err != nil {
		return err
	}
	return s.storage.Sync()
}

func (s *faultyStorage) PunchHole(off, length int64) error {
	if err := s.fail("punch", s.path); err != nil {
		return err
	}
	return s.storage.PunchHole(off, length)
}

func (s *faultyStorage) ZeroRange(off, length int64) error {
	if err := s.fail("zero", s.path); err != nil {
		return err
	}
	return s.storage.ZeroRange(off, length)
}

func (s *faultyStorage) Truncate(size int64) error {
	if err := s.fail("truncate", s.path); err != nil {
		return err
	}
	return s.storage.Truncate(size)
}
