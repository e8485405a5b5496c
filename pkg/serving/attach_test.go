package serving

import (
	"strings"
	"testing"
	"time"

	"github.com/ploop-csi/ploop-csi/pkg/nbd"
)

// TestAttachOptions: what the kernel cannot take is refused before any
// device or sysfs is touched, and the rest maps onto pkg/nbd's options.
func TestAttachOptions(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  AttachOptions
		ok    bool
		index int
	}{
		{"defaults", AttachOptions{BackendID: "pvc-1"}, true, nbd.AnyDevice},
		{"device", AttachOptions{BackendID: "pvc-1", Device: "/dev/nbd3"}, true, 3},
		{"timeouts", AttachOptions{BackendID: "pvc-1", Timeout: 5 * time.Second, DeadConnTimeout: 2 * time.Minute}, true, nbd.AnyDevice},
		{"no id", AttachOptions{}, false, 0},
		{"id too long", AttachOptions{BackendID: strings.Repeat("x", 256)}, false, 0},
		{"id with newline", AttachOptions{BackendID: "a\nb"}, false, 0},
		{"id with NUL", AttachOptions{BackendID: "a\x00b"}, false, 0},
		{"not an nbd device", AttachOptions{BackendID: "pvc-1", Device: "/dev/sda"}, false, 0},
		{"fractional timeout", AttachOptions{BackendID: "pvc-1", Timeout: 1500 * time.Millisecond}, false, 0},
		{"timeout under a second", AttachOptions{BackendID: "pvc-1", DeadConnTimeout: time.Millisecond}, false, 0},
		{"negative connections", AttachOptions{BackendID: "pvc-1", Connections: -1}, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := tc.opts.nbdOptions()
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if !tc.ok {
				return
			}
			if n.Index != tc.index || n.BackendID != tc.opts.BackendID || n.Export != tc.opts.BackendID ||
				n.Timeout != tc.opts.Timeout || n.DeadConnTimeout != tc.opts.DeadConnTimeout {
				t.Fatalf("nbd options %+v from %+v", n, tc.opts)
			}
		})
	}
}
