package serving

import (
	"errors"
	"testing"

	"github.com/ploop-csi/ploop-csi/pkg/ublk"
)

func TestUblkTag(t *testing.T) {
	seen := map[uint64]string{}
	for _, id := range []string{"", "a", "b", "pvc-0b1c", "pvc-0b1d", "ploop-ext4"} {
		tag := UblkTag(id)
		if tag == 0 {
			t.Errorf("tag of %q is zero, which other servers' devices carry", id)
		}
		if tag != UblkTag(id) {
			t.Errorf("tag of %q is not stable", id)
		}
		if other, ok := seen[tag]; ok {
			t.Errorf("%q and %q share tag %#x", id, other, tag)
		}
		seen[tag] = id
	}
}

func TestUblkOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts UblkOptions
	}{
		{"no control", UblkOptions{BackendID: "v"}},
		{"no backend id", UblkOptions{Control: &ublk.Control{}}},
	} {
		if _, err := tc.opts.ublkOptions(); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	o, err := UblkOptions{Control: &ublk.Control{}, BackendID: "v", Queues: 2, Inline: true}.ublkOptions()
	if err != nil {
		t.Fatal(err)
	}
	// Recoverable and 4096-byte blocks are what the restart model and a
	// filesystem moving between transports rely on.
	if !o.Recoverable || o.BlockSize != 4096 || o.Tag != UblkTag("v") || o.Queues != 2 || !o.Inline {
		t.Fatalf("options %+v", o)
	}
}

// failingDisk fails every request.
type failingDisk struct{ ublk.Backend }

var errDisk = errors.New("disk failed")

func (failingDisk) ReadAt([]byte, int64) (int, error)  { return 0, errDisk }
func (failingDisk) WriteAt([]byte, int64) (int, error) { return 0, errDisk }
func (failingDisk) Flush() error                       { return errDisk }
func (failingDisk) Discard(int64, int64) error         { return errDisk }
func (failingDisk) WriteZeroes(int64, int64, bool) error {
	return errDisk
}

func TestReportingBackend(t *testing.T) {
	var got []error
	b := reportingBackend{Backend: failingDisk{}, report: func(err error) { got = append(got, err) }}
	b.ReadAt(nil, 0)
	b.WriteAt(nil, 0)
	b.Flush()
	b.Discard(0, 1)
	if err := b.WriteZeroes(0, 1, false); !errors.Is(err, errDisk) {
		t.Fatalf("error not passed on: %v", err)
	}
	if len(got) != 5 {
		t.Fatalf("%d of 5 errors reported", len(got))
	}
}
