package nodeagent

import (
	"errors"
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

func TestVolumeRequest(t *testing.T) {
	q := func(s string) resource.Quantity { return resource.MustParse(s) }
	qp := func(s string) *resource.Quantity { v := resource.MustParse(s); return &v }
	id := catalog.NewVolumeID(catalog.Ploop)
	tests := []struct {
		name string
		spec v1alpha1.PloopVolumeSpec
		want catalog.VolumeRequest
		bad  bool
	}{
		{"everything", v1alpha1.PloopVolumeSpec{Name: "pvc-1", Type: "ploop", Size: q("1Gi"), Limit: qp("2Gi"), FSType: "xfs",
			ClusterSize: 1 << 20, MkfsOptions: "-m 0", Inodes: 7, Discard: "online", Source: &v1alpha1.VolumeSource{Snapshot: "s"}},
			catalog.VolumeRequest{Name: "pvc-1", ID: id, Type: catalog.Ploop, RequiredBytes: 1 << 30, LimitBytes: 2 << 30, FSType: "xfs",
				ClusterSize: 1 << 20, MkfsOptions: "-m 0", Inodes: 7, Discard: "online", SourceSnapshot: "s"}, false},
		{"defaults", v1alpha1.PloopVolumeSpec{Name: "pvc-2", Type: "ploop"},
			catalog.VolumeRequest{Name: "pvc-2", ID: id, Type: catalog.Ploop}, false},
		{"a fraction of a byte rounds up", v1alpha1.PloopVolumeSpec{Name: "pvc-3", Type: "ploop", Size: q("1m")},
			catalog.VolumeRequest{Name: "pvc-3", ID: id, Type: catalog.Ploop, RequiredBytes: 1}, false},
		{"negative size", v1alpha1.PloopVolumeSpec{Name: "pvc-4", Type: "ploop", Size: q("-1Gi")}, catalog.VolumeRequest{}, true},
		{"size beyond int64", v1alpha1.PloopVolumeSpec{Name: "pvc-5", Type: "ploop", Size: q("100Ei")}, catalog.VolumeRequest{}, true},
		{"negative limit", v1alpha1.PloopVolumeSpec{Name: "pvc-6", Type: "ploop", Limit: qp("-1")}, catalog.VolumeRequest{}, true},
		{"negative inodes", v1alpha1.PloopVolumeSpec{Name: "pvc-7", Type: "simfs", Inodes: -1}, catalog.VolumeRequest{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := VolumeRequest(&v1alpha1.PloopVolume{ObjectMeta: metav1.ObjectMeta{Name: id}, Spec: tt.spec})
			if tt.bad {
				if !errors.Is(err, catalog.ErrInvalid) {
					t.Fatalf("VolumeRequest = %+v, %v; want ErrInvalid", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("VolumeRequest = %+v, %v\nwant %+v", got, err, tt.want)
			}
		})
	}
}

func TestSettled(t *testing.T) {
	perm := &v1alpha1.OperationError{Code: catalog.ClassOf(catalog.ErrNoSpace), Message: "full"}
	transient := &v1alpha1.OperationError{Code: catalog.ClassOf(catalog.ErrBusy), Message: "busy"}
	internal := &v1alpha1.OperationError{Message: "disk on fire"}
	tests := []struct {
		name          string
		gen, observed int64
		phase         v1alpha1.Phase
		err           *v1alpha1.OperationError
		want          bool
	}{
		{"new resource", 1, 0, "", nil, false},
		{"ready", 2, 2, v1alpha1.Ready, nil, true},
		{"ready for an older spec", 3, 2, v1alpha1.Ready, nil, false},
		{"failed for good", 2, 2, v1alpha1.Failed, perm, true},
		{"failed for good, spec changed since", 3, 2, v1alpha1.Failed, perm, false},
		{"failed, a retry may cure it", 2, 2, v1alpha1.Failed, transient, false},
		{"failed, internal", 2, 2, v1alpha1.Failed, internal, false},
	}
	for _, tt := range tests {
		if got := settled(tt.gen, tt.observed, tt.phase, tt.err); got != tt.want {
			t.Errorf("%s: settled = %t, want %t", tt.name, got, tt.want)
		}
	}
}
