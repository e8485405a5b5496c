package v1alpha1

import (
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Phase is where a resource's operation stands.
// +kubebuilder:validation:Enum=Pending;Ready;Failed;Deleting
type Phase string

const (
	// Pending: the owning node has not carried out the spec yet.
	Pending Phase = "Pending"
	// Ready: the volume or snapshot exists as the spec asks.
	Ready Phase = "Ready"
	// Failed: the last attempt failed; Status.Error says why, and the
	// node retries while the error is one a retry can cure.
	Failed Phase = "Failed"
	// Deleting: the resource is being deleted; its finalizer stays
	// until the node has removed what it stands for.
	Deleting Phase = "Deleting"
)

// Finalizer keeps a PloopVolume or PloopSnapshot until the node that owns
// it has removed what it stands for from its storage root.
const Finalizer = "ploop.io/storage"

// NodeLabel carries spec.nodeName as a label, so that each node plugin
// watches only its own resources.
const NodeLabel = "ploop.io/node"

// AttachedLabel carries status.attachedNode of a volume on a shared
// storage root as a label, so that each node plugin watches only the
// volumes it serves (for their online operations).
const AttachedLabel = "ploop.io/attached"

// CapacityAnnotation prefixes the Node annotations in which each node
// plugin publishes what its storage root can still promise, in bytes, per
// volume type (capacity.ploop.io/ploop, capacity.ploop.io/simfs): the
// controller answers GetCapacity for a node's topology segment from them.
const CapacityAnnotation = "capacity.ploop.io/"

// OperationError is the last failure of a node's operation, as the CSI
// call that waits for it will report it.
type OperationError struct {
	// Code is the storage catalogue's error class, such as NoSpace or
	// Invalid, which the controller maps to a gRPC code as it maps the
	// catalogue's own errors; empty for an internal error.
	// +optional
	Code string `json:"code,omitempty"`
	// Message says what failed, for a person to act on.
	Message string `json:"message"`
}

// VolumeSource is the content a new volume starts from: one of a snapshot
// or a volume, by the catalogue's id.
type VolumeSource struct {
	// +optional
	Snapshot string `json:"snapshot,omitempty"`
	// +optional
	Volume string `json:"volume,omitempty"`
}

// PloopVolumeSpec is what the controller asks of the owning node.
type PloopVolumeSpec struct {
	// Name is the CSI volume name (the provisioner's, usually pvc-UID);
	// creating the same name twice gives the same volume.
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
	// NodeName is the node whose storage root holds the volume; empty
	// with a shared storage root.
	// +optional
	NodeName string `json:"nodeName,omitempty"`
	// Type is the kind of volume.
	// +kubebuilder:validation:Enum=ploop;simfs
	Type string `json:"type"`
	// Size is the requested size in bytes (0: the default, or the
	// source's size); growing it expands the volume, online when it is
	// attached.
	Size resource.Quantity `json:"size"`
	// Limit is the most the volume may have after rounding; unset means
	// no limit.
	// +optional
	Limit *resource.Quantity `json:"limit,omitempty"`
	// FSType is the file system of a ploop volume mounted as one.
	// +kubebuilder:validation:Enum=ext4;xfs
	// +optional
	FSType string `json:"fsType,omitempty"`
	// ClusterSize is the ploop cluster size in bytes; 0 takes the default.
	// +kubebuilder:validation:Minimum=0
	// +optional
	ClusterSize int64 `json:"clusterSize,omitempty"`
	// MkfsOptions are extra arguments for mkfs on the node.
	// +optional
	MkfsOptions string `json:"mkfsOptions,omitempty"`
	// Inodes is a simfs volume's inode limit; 0 derives it from the size.
	// +kubebuilder:validation:Minimum=0
	// +optional
	Inodes int64 `json:"inodes,omitempty"`
	// Discard is how freed space returns to the storage root.
	// +kubebuilder:validation:Enum=periodic;online
	// +optional
	Discard string `json:"discard,omitempty"`
	// Source is the content the volume starts from.
	// +optional
	Source *VolumeSource `json:"source,omitempty"`
	// Online, with a shared storage root, asks the node that serves the
	// volume (status.attachedNode) to carry out an operation on its
	// served stack: the controller owns the root's catalogue, but only
	// the serving process may write the stack. status.online answers it.
	// +optional
	Online *OnlineRequest `json:"online,omitempty"`
}

// OnlineRequest is one operation on a served stack (see
// PloopVolumeSpec.Online).
type OnlineRequest struct {
	// ID tells requests apart: status.online answers the request of its
	// ID, and a node carries out each ID once.
	// +kubebuilder:validation:MinLength=1
	ID string `json:"id"`
	// Op is the operation: freeze the top delta (snapshot), merge a
	// frozen delta into the one above it (deleteSnapshot), set a larger
	// virtual size (grow), or compact the top delta.
	// +kubebuilder:validation:Enum=snapshot;deleteSnapshot;grow;compact
	Op string `json:"op"`
	// GUID is the delta deleteSnapshot merges.
	// +optional
	GUID string `json:"guid,omitempty"`
	// Size is the virtual size in bytes that grow sets.
	// +kubebuilder:validation:Minimum=0
	// +optional
	Size int64 `json:"size,omitempty"`
}

// The operations of an OnlineRequest.
const (
	OnlineSnapshot       = "snapshot"
	OnlineDeleteSnapshot = "deleteSnapshot"
	OnlineGrow           = "grow"
	OnlineCompact        = "compact"
)

// OnlineResult is a node's answer to an OnlineRequest.
type OnlineResult struct {
	// ID is the request's.
	ID string `json:"id"`
	// GUID is the delta a snapshot froze.
	// +optional
	GUID string `json:"guid,omitempty"`
	// Error is the operation's failure; none means it was done.
	// +optional
	Error *OperationError `json:"error,omitempty"`
}

// PloopVolumeStatus is what the owning node reports.
type PloopVolumeStatus struct {
	// Phase is where the volume's last requested operation stands.
	// +optional
	Phase Phase `json:"phase,omitempty"`
	// VolumeID is the catalogue's id of the volume, once created.
	// +optional
	VolumeID string `json:"volumeID,omitempty"`
	// Size is the provisioned size after rounding.
	// +optional
	Size *resource.Quantity `json:"size,omitempty"`
	// Allocated is the storage root's space the volume takes.
	// +optional
	Allocated *resource.Quantity `json:"allocated,omitempty"`
	// NodeExpansionRequired says the last expansion still needs the
	// node to grow the file system (NodeExpandVolume).
	// +optional
	NodeExpansionRequired bool `json:"nodeExpansionRequired,omitempty"`
	// AttachedNode is the node that serves the volume now, if any: with
	// a shared root, online operations go to it.
	// +optional
	AttachedNode string `json:"attachedNode,omitempty"`
	// Online answers spec.online.
	// +optional
	Online *OnlineResult `json:"online,omitempty"`
	// Effective are the volume's parameters as the node's catalogue made
	// it, defaults filled in: what the volume's CSI context says, and
	// what the node checks a context against when it stages the volume.
	// +optional
	Effective *EffectiveParameters `json:"effective,omitempty"`
	// ObservedGeneration is the spec generation the status reports on.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Error is the last operation's failure, cleared by a success.
	// +optional
	Error *OperationError `json:"error,omitempty"`
}

// EffectiveParameters are a volume's parameters with defaults filled in.
type EffectiveParameters struct {
	// +optional
	FSType string `json:"fsType,omitempty"`
	// +optional
	ClusterSize int64 `json:"clusterSize,omitempty"`
	// +optional
	MkfsOptions string `json:"mkfsOptions,omitempty"`
	// +optional
	Inodes int64 `json:"inodes,omitempty"`
	// +optional
	Discard string `json:"discard,omitempty"`
}

// PloopVolume is one volume of the driver and the node that owns it.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=plvol,categories=ploop
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.spec.nodeName`
// +kubebuilder:printcolumn:name="Type",type=string,JSONPath=`.spec.type`
// +kubebuilder:printcolumn:name="Size",type=string,JSONPath=`.status.size`
// +kubebuilder:printcolumn:name="Allocated",type=string,JSONPath=`.status.allocated`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type PloopVolume struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec PloopVolumeSpec `json:"spec"`
	// +optional
	Status PloopVolumeStatus `json:"status,omitempty"`
}

// PloopVolumeList is a list of PloopVolumes.
//
// +kubebuilder:object:root=true
type PloopVolumeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []PloopVolume `json:"items"`
}

// PloopSnapshotSpec is what the controller asks of the node that owns the
// source volume.
type PloopSnapshotSpec struct {
	// Name is the CSI snapshot name; taking the same name twice gives the
	// same snapshot.
	// +kubebuilder:validation:MinLength=1
	Name string `json:"name"`
	// NodeName is the node whose storage root holds the source volume;
	// empty with a shared storage root.
	// +optional
	NodeName string `json:"nodeName,omitempty"`
	// SourceVolume is the catalogue's id of the volume to snapshot.
	// +kubebuilder:validation:MinLength=1
	SourceVolume string `json:"sourceVolume"`
}

// PloopSnapshotStatus is what the owning node reports.
type PloopSnapshotStatus struct {
	// Phase is where the snapshot's operation stands.
	// +optional
	Phase Phase `json:"phase,omitempty"`
	// SnapshotID is the catalogue's id of the snapshot, once taken.
	// +optional
	SnapshotID string `json:"snapshotID,omitempty"`
	// ReadyToUse says a volume can be restored from the snapshot.
	// +optional
	ReadyToUse bool `json:"readyToUse,omitempty"`
	// Size is the size of a volume restored from the snapshot.
	// +optional
	Size *resource.Quantity `json:"size,omitempty"`
	// CreationTime is when the snapshot was cut.
	// +optional
	CreationTime *metav1.Time `json:"creationTime,omitempty"`
	// ObservedGeneration is the spec generation the status reports on.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Error is the last operation's failure, cleared by a success.
	// +optional
	Error *OperationError `json:"error,omitempty"`
}

// PloopSnapshot is one snapshot of a volume of the driver.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=plsnap,categories=ploop
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.spec.nodeName`
// +kubebuilder:printcolumn:name="Source",type=string,JSONPath=`.spec.sourceVolume`
// +kubebuilder:printcolumn:name="ReadyToUse",type=boolean,JSONPath=`.status.readyToUse`
// +kubebuilder:printcolumn:name="Size",type=string,JSONPath=`.status.size`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type PloopSnapshot struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec PloopSnapshotSpec `json:"spec"`
	// +optional
	Status PloopSnapshotStatus `json:"status,omitempty"`
}

// PloopSnapshotList is a list of PloopSnapshots.
//
// +kubebuilder:object:root=true
type PloopSnapshotList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []PloopSnapshot `json:"items"`
}
