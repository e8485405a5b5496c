package v1alpha1

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"sigs.k8s.io/yaml"
)

// crd is the part of a CustomResourceDefinition the tests read.
type crd struct {
	Kind string `json:"kind"`
	Spec struct {
		Group string `json:"group"`
		Scope string `json:"scope"`
		Names struct {
			Kind       string   `json:"kind"`
			Plural     string   `json:"plural"`
			ShortNames []string `json:"shortNames"`
		} `json:"names"`
		Versions []struct {
			Name         string `json:"name"`
			Served       bool   `json:"served"`
			Storage      bool   `json:"storage"`
			Subresources struct {
				Status *struct{} `json:"status"`
			} `json:"subresources"`
			Columns []struct {
				Name     string `json:"name"`
				JSONPath string `json:"jsonPath"`
			} `json:"additionalPrinterColumns"`
		} `json:"versions"`
	} `json:"spec"`
}

// TestGeneratedCRDs reads the manifests controller-gen made from these
// types (make generate) and checks what operators and the controller rely
// on: the group and version, cluster scope, the status subresource (the
// node writes only status), and the printer columns of `kubectl get`.
func TestGeneratedCRDs(t *testing.T) {
	dir := filepath.Join("..", "..", "..", "charts", "ploop-csi", "crds")
	for _, tc := range []struct {
		file, kind, plural string
		columns            []string
	}{
		{"ploop.io_ploopvolumes.yaml", "PloopVolume", "ploopvolumes",
			[]string{"Node", "Type", "Size", "Allocated", "Phase", "Age"}},
		{"ploop.io_ploopsnapshots.yaml", "PloopSnapshot", "ploopsnapshots",
			[]string{"Node", "Source", "ReadyToUse", "Size", "Phase", "Age"}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(dir, tc.file))
			if err != nil {
				t.Fatalf("%v (run make generate)", err)
			}
			var c crd
			if err := yaml.Unmarshal(b, &c); err != nil {
				t.Fatal(err)
			}
			s := c.Spec
			if c.Kind != "CustomResourceDefinition" || s.Group != GroupVersion.Group || s.Names.Kind != tc.kind ||
				s.Names.Plural != tc.plural || s.Scope != "Cluster" {
				t.Fatalf("CRD %s: kind %q, group %q, names %+v, scope %q", tc.file, c.Kind, s.Group, s.Names, s.Scope)
			}
			if len(s.Versions) != 1 || s.Versions[0].Name != GroupVersion.Version || !s.Versions[0].Served || !s.Versions[0].Storage {
				t.Fatalf("CRD %s: versions %+v, want %s served and stored", tc.file, s.Versions, GroupVersion.Version)
			}
			v := s.Versions[0]
			if v.Subresources.Status == nil {
				t.Errorf("CRD %s has no status subresource", tc.file)
			}
			var names []string
			for _, c := range v.Columns {
				names = append(names, c.Name)
			}
			if !slices.Equal(names, tc.columns) {
				t.Errorf("CRD %s printer columns %v, want %v", tc.file, names, tc.columns)
			}
		})
	}
}

// TestRoundTrip encodes both kinds through a scheme with AddToScheme and
// decodes them back, and checks that deep copies share nothing.
func TestRoundTrip(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	codecs := serializer.NewCodecFactory(scheme)
	size, limit := resource.MustParse("10Gi"), resource.MustParse("20Gi")
	now := metav1.Now().Rfc3339Copy()
	for _, obj := range []runtime.Object{
		&PloopVolume{
			TypeMeta:   metav1.TypeMeta{APIVersion: GroupVersion.String(), Kind: "PloopVolume"},
			ObjectMeta: metav1.ObjectMeta{Name: "pvc-1", Finalizers: []string{"ploop.io/node"}},
			Spec: PloopVolumeSpec{Name: "pvc-1", NodeName: "n1", Type: "ploop", Size: size, FSType: "xfs",
				Limit: &limit, ClusterSize: 1 << 20, Discard: "online", Source: &VolumeSource{Snapshot: "s1"}},
			Status: PloopVolumeStatus{Phase: Failed, Size: &size, Error: &OperationError{Code: "ResourceExhausted", Message: "full"}},
		},
		&PloopSnapshot{
			TypeMeta:   metav1.TypeMeta{APIVersion: GroupVersion.String(), Kind: "PloopSnapshot"},
			ObjectMeta: metav1.ObjectMeta{Name: "snap-1"},
			Spec:       PloopSnapshotSpec{Name: "snap-1", NodeName: "n1", SourceVolume: "v1"},
			Status:     PloopSnapshotStatus{Phase: Ready, ReadyToUse: true, Size: &size, CreationTime: &now},
		},
	} {
		data, err := runtime.Encode(codecs.LegacyCodec(GroupVersion), obj)
		if err != nil {
			t.Fatal(err)
		}
		back, err := runtime.Decode(codecs.UniversalDecoder(GroupVersion), data)
		if err != nil {
			t.Fatalf("decode %s: %v", data, err)
		}
		back.GetObjectKind().SetGroupVersionKind(obj.GetObjectKind().GroupVersionKind())
		if !reflect.DeepEqual(normalize(back), normalize(obj)) {
			t.Errorf("round trip changed the object:\n got %#v\nwant %#v", back, obj)
		}
		cp := obj.DeepCopyObject()
		switch o := cp.(type) {
		case *PloopVolume:
			o.Spec.Limit.Set(1)
			o.Status.Error.Message = "changed"
			if orig := obj.(*PloopVolume); orig.Spec.Limit.Cmp(resource.MustParse("20Gi")) != 0 || orig.Status.Error.Message != "full" {
				t.Error("a deep copy of a PloopVolume shares its map or pointers")
			}
		case *PloopSnapshot:
			o.Status.CreationTime.Time = o.Status.CreationTime.Add(1)
			if orig := obj.(*PloopSnapshot); !orig.Status.CreationTime.Equal(&now) {
				t.Error("a deep copy of a PloopSnapshot shares its time")
			}
		}
	}
}

// normalize makes quantities and times compare by value: a decoded Quantity
// keeps its string form cached, a constructed one may not, and a decoded
// time is in the local zone.
func normalize(obj runtime.Object) runtime.Object {
	obj = obj.DeepCopyObject()
	fix := func(q *resource.Quantity) {
		if q != nil {
			*q = resource.MustParse(q.String())
		}
	}
	switch o := obj.(type) {
	case *PloopVolume:
		fix(&o.Spec.Size)
		fix(o.Status.Size)
	case *PloopSnapshot:
		fix(o.Status.Size)
		if t := o.Status.CreationTime; t != nil {
			t.Time = t.UTC()
		}
	}
	return obj
}
