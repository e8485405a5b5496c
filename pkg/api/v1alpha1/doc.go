// Package v1alpha1 holds the driver's custom resources, group ploop.io: how
// the controller asks the node that owns a volume to create, snapshot, grow
// or delete it, and how that node reports back (DESIGN.md §3).
//
// A PloopVolume or PloopSnapshot is written by the controller with the
// request in its spec; the owning node's reconciler carries it out through
// the storage root's catalogue and records the outcome in its status. The
// controller waits for that status, with a bound, and answers the CSI call
// from it. Both kinds are cluster-scoped, like the PersistentVolumes and
// VolumeSnapshotContents they stand beside, so that `kubectl get
// ploopvolumes` is an operator's view of the cluster's thin storage.
//
// The CRD manifests are generated from these types by controller-gen
// (`make generate`); do not edit them by hand.
//
// +kubebuilder:object:generate=true
// +groupName=ploop.io
package v1alpha1
