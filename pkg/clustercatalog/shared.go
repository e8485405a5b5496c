package clustercatalog

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/uuid"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
	"github.com/ploop-csi/ploop-csi/pkg/keylock"
)

// Shared is the controller's catalogue of a shared storage root (one
// filesystem mounted at the same path on every node, DESIGN.md §3): the
// root's own catalogue, which the controller owns and works on directly,
// with a PloopVolume kept beside each volume. The resource is the
// operator's view (kubectl get ploopvolumes) and the orphan report's, and
// it routes online operations: the node that stages a volume records
// itself in the status (nodeagent.Reporter), and the catalogue's Online
// (SharedOnline) sends an operation on an attached volume to that node.
// The resource is written after the volume is made and removed after the
// volume is gone, so a crash in between leaves at worst a resource the
// CO's retry of the same call completes or removes; its finalizer keeps
// it while the volume exists.
type Shared struct {
	*catalog.Catalog
	c client.Client
	r client.Reader
}

// NewShared returns the catalogue cat with its resources written through
// c. cat's Online should be a SharedOnline on the same API server.
func NewShared(cat *catalog.Catalog, c client.Client, o Options) *Shared {
	return &Shared{Catalog: cat, c: c, r: o.withDefaults(c).Reader}
}

// CreateVolume creates the volume in the root and its resource.
func (s *Shared) CreateVolume(ctx context.Context, req catalog.VolumeRequest) (catalog.Volume, error) {
	v, err := s.Catalog.CreateVolume(ctx, req)
	if err != nil {
		return v, err
	}
	if err := s.recordVolume(ctx, v); err != nil {
		return catalog.Volume{}, fmt.Errorf("create volume %q: %w", req.Name, err)
	}
	return v, nil
}

// recordVolume makes sure volume v has its resource, which reports it ready
// with its size and allocation.
func (s *Shared) recordVolume(ctx context.Context, v catalog.Volume) error {
	vol := &v1alpha1.PloopVolume{
		ObjectMeta: metav1.ObjectMeta{Name: v.ID, Finalizers: []string{v1alpha1.Finalizer},
			Labels: map[string]string{NameLabel: nameHash(v.Name)}},
		Spec: volumeSpec("", catalog.VolumeRequest{
			Name: v.Name, Type: v.Type, RequiredBytes: v.Size, FSType: v.FSType, ClusterSize: v.ClusterSize,
			MkfsOptions: v.MkfsOptions, Inodes: v.Inodes, Discard: v.Discard,
			SourceSnapshot: v.SourceSnapshot, SourceVolume: v.SourceVolume,
		}),
	}
	if err := s.c.Create(ctx, vol); apierrors.IsAlreadyExists(err) {
		if err := s.r.Get(ctx, client.ObjectKeyFromObject(vol), vol); err != nil {
			return apiError(ctx, "read volume "+v.ID, err)
		}
	} else if err != nil {
		return apiError(ctx, "record volume "+v.ID, err)
	}
	orig := vol.DeepCopy()
	if vol.Spec.Size.Value() < v.Size {
		vol.Spec.Size = *resource.NewQuantity(v.Size, resource.BinarySI)
		if err := s.c.Patch(ctx, vol, client.MergeFrom(orig)); err != nil {
			return apiError(ctx, "record the size of volume "+v.ID, err)
		}
		orig = vol.DeepCopy()
	}
	vol.Status.Phase, vol.Status.VolumeID, vol.Status.ObservedGeneration = v1alpha1.Ready, v.ID, vol.Generation
	vol.Status.Size = resource.NewQuantity(v.Size, resource.BinarySI)
	if u, err := s.Catalog.VolumeUsage(ctx, v.ID); err == nil {
		vol.Status.Allocated = resource.NewQuantity(u.AllocatedBytes, resource.BinarySI)
	}
	// A merge patch: the serving node writes attachedNode and online
	// beside it, and neither may undo the other.
	if err := s.c.Status().Patch(ctx, vol, client.MergeFrom(orig)); err != nil {
		return apiError(ctx, "record the status of volume "+v.ID, err)
	}
	return nil
}

// DeleteVolume deletes the volume from the root (ErrInUse while a node
// serves it), then its resource.
func (s *Shared) DeleteVolume(ctx context.Context, id string) error {
	if err := s.Catalog.DeleteVolume(ctx, id); err != nil {
		return err
	}
	return s.dropResource(ctx, &v1alpha1.PloopVolume{ObjectMeta: metav1.ObjectMeta{Name: id}})
}

// dropResource lets obj go: finalizer off, then deleted.
func (s *Shared) dropResource(ctx context.Context, obj client.Object) error {
	if err := s.r.Get(ctx, client.ObjectKeyFromObject(obj), obj); apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return apiError(ctx, "read "+obj.GetName(), err)
	}
	if controllerutil.ContainsFinalizer(obj, v1alpha1.Finalizer) {
		orig := obj.DeepCopyObject().(client.Object)
		controllerutil.RemoveFinalizer(obj, v1alpha1.Finalizer)
		if err := s.c.Patch(ctx, obj, client.MergeFrom(orig)); err != nil && !apierrors.IsNotFound(err) {
			return apiError(ctx, "release "+obj.GetName(), err)
		}
	}
	if err := s.c.Delete(ctx, obj); err != nil && !apierrors.IsNotFound(err) {
		return apiError(ctx, "delete "+obj.GetName(), err)
	}
	return nil
}

// ExpandVolume grows the volume (online on the node that serves it) and
// records the new size.
func (s *Shared) ExpandVolume(ctx context.Context, id string, required, limit int64) (int64, bool, error) {
	size, nodeExpansion, err := s.Catalog.ExpandVolume(ctx, id, required, limit)
	if err != nil {
		return 0, false, err
	}
	v, err := s.Catalog.GetVolume(ctx, id)
	if err != nil {
		return 0, false, err
	}
	if err := s.recordVolume(ctx, v); err != nil {
		return 0, false, fmt.Errorf("expand volume %s: %w", id, err)
	}
	return size, nodeExpansion, nil
}

// CreateSnapshot snapshots the volume (online on the node that serves it)
// and records the snapshot's resource.
func (s *Shared) CreateSnapshot(ctx context.Context, name, sourceVolume string) (catalog.Snapshot, error) {
	sn, err := s.Catalog.CreateSnapshot(ctx, name, sourceVolume)
	if err != nil {
		return sn, err
	}
	res := &v1alpha1.PloopSnapshot{
		ObjectMeta: metav1.ObjectMeta{Name: sn.ID, Finalizers: []string{v1alpha1.Finalizer},
			Labels: map[string]string{NameLabel: nameHash(name)}},
		Spec: v1alpha1.PloopSnapshotSpec{Name: name, SourceVolume: sourceVolume},
	}
	if err := s.c.Create(ctx, res); apierrors.IsAlreadyExists(err) {
		if err := s.r.Get(ctx, client.ObjectKeyFromObject(res), res); err != nil {
			return catalog.Snapshot{}, apiError(ctx, "read snapshot "+sn.ID, err)
		}
	} else if err != nil {
		return catalog.Snapshot{}, apiError(ctx, "record snapshot "+sn.ID, err)
	}
	if res.Status.Phase != v1alpha1.Ready {
		orig := res.DeepCopy()
		created := metav1.NewTime(sn.Created)
		res.Status = v1alpha1.PloopSnapshotStatus{Phase: v1alpha1.Ready, SnapshotID: sn.ID, ReadyToUse: true,
			Size: resource.NewQuantity(sn.Size, resource.BinarySI), CreationTime: &created, ObservedGeneration: res.Generation}
		if err := s.c.Status().Patch(ctx, res, client.MergeFrom(orig)); err != nil {
			return catalog.Snapshot{}, apiError(ctx, "record the status of snapshot "+sn.ID, err)
		}
	}
	return sn, nil
}

// DeleteSnapshot deletes the snapshot from the root, then its resource.
func (s *Shared) DeleteSnapshot(ctx context.Context, id string) error {
	if err := s.Catalog.DeleteSnapshot(ctx, id); err != nil {
		return err
	}
	if catalog.ValidateSnapshotID(id) != nil {
		return nil // no resource can have this name
	}
	return s.dropResource(ctx, &v1alpha1.PloopSnapshot{ObjectMeta: metav1.ObjectMeta{Name: id}})
}

// SharedOnline is the Online of the controller's catalogue of a shared
// root. A volume is attached when its resource's status names the node
// that serves it; an operation on it is written to the resource's
// spec.online with a fresh id, and the answer is the status.online of
// that id, which the node writes after it has carried the operation out
// on its served stack. One operation per volume is in flight at a time.
// A volume that no node records as serving it is ErrNotAttached, and the
// catalogue then works on the stack itself: it takes the stack's lock,
// which a node that began serving it meanwhile holds, so that one side
// fails cleanly rather than both writing.
type SharedOnline struct {
	c    client.Client
	r    client.Reader
	poll time.Duration
	keys keylock.Locks
}

var _ catalog.Online = (*SharedOnline)(nil)

// NewSharedOnline returns the Online that reaches nodes through c.
func NewSharedOnline(c client.Client, o Options) *SharedOnline {
	o = o.withDefaults(c)
	return &SharedOnline{c: c, r: o.Reader, poll: o.Poll}
}

// servedBy is the node that serves volume id, "" for none.
func (o *SharedOnline) servedBy(ctx context.Context, id string) (*v1alpha1.PloopVolume, error) {
	var vol v1alpha1.PloopVolume
	if err := o.r.Get(ctx, client.ObjectKey{Name: id}, &vol); apierrors.IsNotFound(err) {
		return nil, nil // no resource yet: being created, so not staged anywhere
	} else if err != nil {
		return nil, apiError(ctx, "read volume "+id, err)
	}
	return &vol, nil
}

// Attached reports whether a node records that it serves the volume.
func (o *SharedOnline) Attached(ctx context.Context, id string) (bool, error) {
	vol, err := o.servedBy(ctx, id)
	if err != nil {
		return false, err
	}
	return vol != nil && vol.Status.AttachedNode != "", nil
}

// Snapshot freezes the served stack's top delta on its node.
func (o *SharedOnline) Snapshot(ctx context.Context, id string) (string, error) {
	res, err := o.do(ctx, id, v1alpha1.OnlineRequest{Op: v1alpha1.OnlineSnapshot})
	return res.GUID, err
}

// DeleteSnapshot merges delta guid on the node that serves the volume.
func (o *SharedOnline) DeleteSnapshot(ctx context.Context, id, guid string) error {
	_, err := o.do(ctx, id, v1alpha1.OnlineRequest{Op: v1alpha1.OnlineDeleteSnapshot, GUID: guid})
	return err
}

// Grow sets the served stack's virtual size on its node.
func (o *SharedOnline) Grow(ctx context.Context, id string, size int64) error {
	_, err := o.do(ctx, id, v1alpha1.OnlineRequest{Op: v1alpha1.OnlineGrow, Size: size})
	return err
}

// Compact compacts the served stack's top delta on its node.
func (o *SharedOnline) Compact(ctx context.Context, id string) error {
	_, err := o.do(ctx, id, v1alpha1.OnlineRequest{Op: v1alpha1.OnlineCompact})
	return err
}

func (o *SharedOnline) do(ctx context.Context, id string, req v1alpha1.OnlineRequest) (v1alpha1.OnlineResult, error) {
	unlock, err := o.keys.Lock(ctx, id)
	if err != nil {
		return v1alpha1.OnlineResult{}, fmt.Errorf("%s %s: waiting for the operation in flight: %w", req.Op, id, err)
	}
	defer unlock()
	vol, err := o.servedBy(ctx, id)
	if err != nil {
		return v1alpha1.OnlineResult{}, err
	}
	if vol == nil || vol.Status.AttachedNode == "" {
		return v1alpha1.OnlineResult{}, fmt.Errorf("%s %s: %w", req.Op, id, catalog.ErrNotAttached)
	}
	node := vol.Status.AttachedNode
	req.ID = string(uuid.NewUUID())
	orig := vol.DeepCopy()
	vol.Spec.Online = &req
	if err := o.c.Patch(ctx, vol, client.MergeFrom(orig)); err != nil {
		return v1alpha1.OnlineResult{}, apiError(ctx, fmt.Sprintf("ask node %s to %s volume %s", node, req.Op, id), err)
	}
	for {
		if err := sleep(ctx, o.poll); err != nil {
			return v1alpha1.OnlineResult{}, fmt.Errorf("%s %s: waiting for node %s: %w", req.Op, id, node, err)
		}
		if err := o.r.Get(ctx, client.ObjectKey{Name: id}, vol); err != nil {
			return v1alpha1.OnlineResult{}, apiError(ctx, "read volume "+id, err)
		}
		if res := vol.Status.Online; res != nil && res.ID == req.ID {
			if res.Error != nil {
				return *res, nodeError(node, res.Error)
			}
			return *res, nil
		}
		if vol.Status.AttachedNode != node {
			// The node stopped serving the volume before it answered:
			// whether the operation ran is unknown, and every operation
			// is safe to repeat, so the CO's retry decides anew.
			return v1alpha1.OnlineResult{}, fmt.Errorf("%s %s: node %s stopped serving the volume before it answered: %w",
				req.Op, id, node, catalog.ErrBusy)
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
