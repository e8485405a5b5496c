package drivere2e

import (
	"fmt"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// testOvercommit: with --overcommit-ratio 1.0 the root promises no more
// than its size. A volume larger than the root is ResourceExhausted at
// once; volumes are then created until one would exceed the root: every
// creation succeeds exactly when GetCapacity said it fits, the one that
// does not fit gets ResourceExhausted, one of exactly the capacity left
// (whole MiB) still fits, and deleting them gives the capacity back.
func testOvercommit(t *testing.T) {
	const size = 48 * mib
	e := newEnv(t, 256, "--overcommit-ratio", "1.0")
	rootSize, _ := statfs(t, e.root)
	capacity := func() int64 {
		t.Helper()
		r, err := e.d.Controller.GetCapacity(e.ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"type": "ploop"},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4")}})
		if err != nil {
			t.Fatalf("GetCapacity: %v", err)
		}
		return r.GetAvailableCapacity()
	}
	initial := capacity()
	if initial <= 0 || initial > rootSize {
		t.Fatalf("GetCapacity on an empty %d MiB root: %d bytes", rootSize>>20, initial)
	}
	_, err := e.d.Controller.CreateVolume(e.ctx, createReq("larger-than-root", 2*rootSize, mountCap("ext4"), nil))
	wantCode(t, "CreateVolume of twice the root", err, codes.ResourceExhausted)

	var ids []string
	var provisioned int64
	for i := 0; ; i++ {
		c := capacity()
		if c > rootSize-provisioned {
			t.Fatalf("GetCapacity %d with %d of %d bytes provisioned at ratio 1.0", c, provisioned, rootSize)
		}
		r, err := e.d.Controller.CreateVolume(e.ctx, createReq(fmt.Sprintf("oc-%d", i), size, mountCap("ext4"), nil))
		if c < size {
			wantCode(t, fmt.Sprintf("CreateVolume %d of %d MiB with %d bytes of capacity left", i, size>>20, c), err, codes.ResourceExhausted)
			t.Logf("volume %d of %d MiB refused with %d MiB provisioned on a %d MiB root, GetCapacity %d bytes: %v",
				i, size>>20, provisioned>>20, rootSize>>20, c, status.Convert(err).Message())
			break
		}
		if err != nil {
			t.Fatalf("CreateVolume %d of %d MiB with %d bytes of capacity left: %v", i, size>>20, c, err)
		}
		ids, provisioned = append(ids, r.GetVolume().GetVolumeId()), provisioned+size
		if i > int(rootSize/size) {
			t.Fatalf("%d volumes of %d MiB on a %d MiB root at ratio 1.0", i+1, size>>20, rootSize>>20)
		}
	}
	if len(ids) < 2 {
		t.Fatalf("only %d volumes of %d MiB fit a %d MiB root", len(ids), size>>20, rootSize>>20)
	}
	// What is left still fits, to the MiB; after it, not a MiB more.
	if rest := capacity() / mib * mib; rest > 0 {
		r, err := e.d.Controller.CreateVolume(e.ctx, createReq("oc-rest", rest, mountCap("ext4"), nil))
		if err != nil {
			t.Fatalf("CreateVolume of the %d bytes GetCapacity reported: %v", rest, err)
		}
		ids, provisioned = append(ids, r.GetVolume().GetVolumeId()), provisioned+rest
	}
	if c := capacity(); c >= mib {
		t.Fatalf("GetCapacity %d after the rest was taken", c)
	}
	_, err = e.d.Controller.CreateVolume(e.ctx, createReq("oc-one-more", mib, mountCap("ext4"), nil))
	wantCode(t, "CreateVolume of 1 MiB on a full root", err, codes.ResourceExhausted)
	t.Logf("%d volumes, %d MiB provisioned on a %d MiB root (GetCapacity at start %d MiB)", len(ids), provisioned>>20, rootSize>>20, initial>>20)

	for _, id := range ids {
		if _, err := e.d.Controller.DeleteVolume(e.ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if c := capacity(); c < initial-mib {
		t.Errorf("GetCapacity %d after every volume was deleted, %d at start", c, initial)
	}
	e.finish()
}
