package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of the driver's resources.
var GroupVersion = schema.GroupVersion{Group: "ploop.io", Version: "v1alpha1"}

// AddToScheme registers the resources with a scheme.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&PloopVolume{}, &PloopVolumeList{},
		&PloopSnapshot{}, &PloopSnapshotList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
