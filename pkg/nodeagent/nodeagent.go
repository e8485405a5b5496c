package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// Catalog is what the reconcilers use of the node's storage catalogue; a
// *catalog.Catalog is one.
type Catalog interface {
	CreateVolume(ctx context.Context, req catalog.VolumeRequest) (catalog.Volume, error)
	GetVolume(ctx context.Context, id string) (catalog.Volume, error)
	DeleteVolume(ctx context.Context, id string) error
	ExpandVolume(ctx context.Context, id string, required, limit int64) (int64, bool, error)
	VolumeUsage(ctx context.Context, id string) (catalog.Usage, error)
	CreateSnapshotWithID(ctx context.Context, id, name, sourceVolume string) (catalog.Snapshot, error)
	DeleteSnapshot(ctx context.Context, id string) error
	Capacity(ctx context.Context, typ catalog.Type) (catalog.Capacity, error)
}

var _ Catalog = (*catalog.Catalog)(nil)

// Options configure the reconcilers.
type Options struct {
	// NodeName is this node's name: the resources it reconciles have it
	// in spec.nodeName.
	NodeName string
	Catalog  Catalog
	// Recorder, when set, gets a Warning Event on a resource whose
	// operation failed.
	Recorder record.EventRecorder
	// OperationTimeout bounds one catalogue operation; default 5 minutes.
	OperationTimeout time.Duration
	// CapacityInterval is how often the Node's capacity annotations are
	// refreshed besides after each operation; default
	// DefaultCapacityInterval.
	CapacityInterval time.Duration
}

// CacheOptions make a manager's cache hold only the custom resources of
// node: with many nodes, each plugin then watches and stores its own.
func CacheOptions(node string) cache.Options {
	sel := labels.SelectorFromSet(labels.Set{v1alpha1.NodeLabel: node})
	return cache.Options{ByObject: map[client.Object]cache.ByObject{
		&v1alpha1.PloopVolume{}:   {Label: sel},
		&v1alpha1.PloopSnapshot{}: {Label: sel},
	}}
}

// Setup registers the reconcilers of PloopVolume and PloopSnapshot with
// mgr, whose cache should be made with CacheOptions.
func Setup(mgr ctrl.Manager, o Options) error {
	if o.NodeName == "" || o.Catalog == nil {
		return errors.New("nodeagent: NodeName and Catalog are required")
	}
	if o.OperationTimeout <= 0 {
		o.OperationTimeout = 5 * time.Minute
	}
	if o.CapacityInterval <= 0 {
		o.CapacityInterval = DefaultCapacityInterval
	}
	a := &agent{c: mgr.GetClient(), o: o, capacity: &capacityPublisher{
		c: mgr.GetClient(), node: o.NodeName, cat: o.Catalog, interval: o.CapacityInterval, kick: make(chan struct{}, 1)}}
	if err := mgr.Add(a.capacity); err != nil {
		return fmt.Errorf("nodeagent: %w", err)
	}
	if err := ctrl.NewControllerManagedBy(mgr).Named("ploopvolume").For(&v1alpha1.PloopVolume{}).
		Complete(reconcile.Func(a.reconcileVolume)); err != nil {
		return fmt.Errorf("nodeagent: %w", err)
	}
	if err := ctrl.NewControllerManagedBy(mgr).Named("ploopsnapshot").For(&v1alpha1.PloopSnapshot{}).
		Complete(reconcile.Func(a.reconcileSnapshot)); err != nil {
		return fmt.Errorf("nodeagent: %w", err)
	}
	return nil
}

type agent struct {
	c        client.Client
	o        Options
	capacity *capacityPublisher
}

// settled reports whether a status already answers the spec's generation
// for good: done, or failed in a way a retry of the same spec cannot cure.
func settled(gen, observed int64, phase v1alpha1.Phase, e *v1alpha1.OperationError) bool {
	if observed != gen {
		return false
	}
	return phase == v1alpha1.Ready || phase == v1alpha1.Failed && e != nil && catalog.Permanent(catalog.FromClass(e.Code, ""))
}

func opError(err error) *v1alpha1.OperationError {
	return &v1alpha1.OperationError{Code: catalog.ClassOf(err), Message: err.Error()}
}

// outcome is what a failed operation returns to controller-runtime: a
// permanent failure is final for this generation (the status says so);
// others are retried with back-off.
func outcome(err error) (reconcile.Result, error) {
	if err == nil || catalog.Permanent(err) {
		return reconcile.Result{}, nil
	}
	return reconcile.Result{}, err
}

func (a *agent) warn(obj client.Object, reason string, err error) {
	if a.o.Recorder != nil {
		a.o.Recorder.Event(obj, "Warning", reason, err.Error())
	}
}

// ensureFinalizer adds the Finalizer before anything is created on the
// root; the controller sets it at creation, this covers a resource made by
// hand.
func (a *agent) ensureFinalizer(ctx context.Context, obj client.Object) error {
	if controllerutil.AddFinalizer(obj, v1alpha1.Finalizer) {
		if err := a.c.Update(ctx, obj); err != nil {
			return fmt.Errorf("add finalizer to %s: %w", obj.GetName(), err)
		}
	}
	return nil
}

// removeFinalizer lets the API server delete obj.
func (a *agent) removeFinalizer(ctx context.Context, obj client.Object) error {
	if controllerutil.RemoveFinalizer(obj, v1alpha1.Finalizer) {
		if err := a.c.Update(ctx, obj); err != nil {
			return fmt.Errorf("remove finalizer from %s: %w", obj.GetName(), err)
		}
	}
	return nil
}

func (a *agent) reconcileVolume(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var vol v1alpha1.PloopVolume
	if err := a.c.Get(ctx, req.NamespacedName, &vol); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if vol.Spec.NodeName != a.o.NodeName {
		return reconcile.Result{}, nil // labelled for us by mistake: not ours to touch
	}
	log := ctrl.LoggerFrom(ctx).WithValues("volume", vol.Name)
	opCtx, cancel := context.WithTimeout(ctx, a.o.OperationTimeout)
	defer cancel()

	if !vol.DeletionTimestamp.IsZero() {
		if !controllerutil.ContainsFinalizer(&vol, v1alpha1.Finalizer) {
			return reconcile.Result{}, nil
		}
		t0 := time.Now()
		if err := a.o.Catalog.DeleteVolume(opCtx, vol.Name); err != nil {
			log.Error(err, "delete volume")
			a.warn(&vol, "DeleteFailed", err)
			vol.Status.Phase, vol.Status.Error = v1alpha1.Deleting, opError(err)
			if serr := a.c.Status().Update(ctx, &vol); serr != nil {
				log.Error(serr, "report the failure")
			}
			return reconcile.Result{}, err // always retried: nothing may be stranded
		}
		log.V(2).Info("volume deleted", "took", time.Since(t0))
		a.capacity.changed()
		return reconcile.Result{}, a.removeFinalizer(ctx, &vol)
	}
	if err := a.ensureFinalizer(ctx, &vol); err != nil {
		return reconcile.Result{}, err
	}
	if settled(vol.Generation, vol.Status.ObservedGeneration, vol.Status.Phase, vol.Status.Error) {
		return reconcile.Result{}, nil
	}

	t0 := time.Now()
	v, nodeExpansion, err := a.applyVolume(opCtx, &vol)
	st := v1alpha1.PloopVolumeStatus{ObservedGeneration: vol.Generation, AttachedNode: vol.Status.AttachedNode}
	if err != nil {
		log.Error(err, "volume operation failed", "generation", vol.Generation, "took", time.Since(t0))
		a.warn(&vol, "OperationFailed", err)
		st.Phase, st.Error = v1alpha1.Failed, opError(err)
		st.VolumeID, st.Size, st.Allocated, st.Effective = vol.Status.VolumeID, vol.Status.Size, vol.Status.Allocated, vol.Status.Effective
	} else {
		log.V(2).Info("volume ready", "generation", vol.Generation, "size", v.Size, "took", time.Since(t0))
		st.Phase, st.VolumeID = v1alpha1.Ready, v.ID
		st.Size = resource.NewQuantity(v.Size, resource.BinarySI)
		st.Effective = &v1alpha1.EffectiveParameters{FSType: v.FSType, ClusterSize: v.ClusterSize, MkfsOptions: v.MkfsOptions,
			Inodes: int64(v.Inodes), Discard: v.Discard}
		st.NodeExpansionRequired = nodeExpansion
		if u, uerr := a.o.Catalog.VolumeUsage(opCtx, v.ID); uerr == nil {
			st.Allocated = resource.NewQuantity(u.AllocatedBytes, resource.BinarySI)
		}
	}
	a.capacity.changed()
	vol.Status = st
	if uerr := a.c.Status().Update(ctx, &vol); uerr != nil {
		return reconcile.Result{}, fmt.Errorf("report volume %s: %w", vol.Name, uerr)
	}
	return outcome(err)
}

// applyVolume makes the root hold the volume the spec describes: created
// when missing, grown when the spec asks for more than it has.
func (a *agent) applyVolume(ctx context.Context, vol *v1alpha1.PloopVolume) (catalog.Volume, bool, error) {
	req, err := VolumeRequest(vol)
	if err != nil {
		return catalog.Volume{}, false, err
	}
	cur, err := a.o.Catalog.GetVolume(ctx, req.ID)
	switch {
	case errors.Is(err, catalog.ErrNotFound):
		v, err := a.o.Catalog.CreateVolume(ctx, req)
		return v, false, err
	case err != nil:
		return catalog.Volume{}, false, err
	case req.RequiredBytes == 0:
		return cur, false, nil
	}
	size, nodeExpansion, err := a.o.Catalog.ExpandVolume(ctx, req.ID, req.RequiredBytes, req.LimitBytes)
	if err != nil {
		return catalog.Volume{}, false, err
	}
	cur.Size = size
	return cur, nodeExpansion, nil
}

// VolumeRequest is the catalogue's request for a PloopVolume: its name is
// the volume's id.
func VolumeRequest(vol *v1alpha1.PloopVolume) (catalog.VolumeRequest, error) {
	s := vol.Spec
	req := catalog.VolumeRequest{
		Name: s.Name, ID: vol.Name, Type: catalog.Type(s.Type), FSType: s.FSType,
		ClusterSize: s.ClusterSize, MkfsOptions: s.MkfsOptions, Discard: s.Discard,
	}
	if s.Inodes < 0 {
		return req, fmt.Errorf("inodes %d: %w", s.Inodes, catalog.ErrInvalid)
	}
	req.Inodes = uint64(s.Inodes)
	var err error
	if req.RequiredBytes, err = bytesOf("size", s.Size); err != nil {
		return req, err
	}
	if s.Limit != nil {
		if req.LimitBytes, err = bytesOf("limit", *s.Limit); err != nil {
			return req, err
		}
	}
	if s.Source != nil {
		req.SourceSnapshot, req.SourceVolume = s.Source.Snapshot, s.Source.Volume
	}
	return req, nil
}

func (a *agent) reconcileSnapshot(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var snap v1alpha1.PloopSnapshot
	if err := a.c.Get(ctx, req.NamespacedName, &snap); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if snap.Spec.NodeName != a.o.NodeName {
		return reconcile.Result{}, nil
	}
	log := ctrl.LoggerFrom(ctx).WithValues("snapshot", snap.Name)
	opCtx, cancel := context.WithTimeout(ctx, a.o.OperationTimeout)
	defer cancel()

	if !snap.DeletionTimestamp.IsZero() {
		if !controllerutil.ContainsFinalizer(&snap, v1alpha1.Finalizer) {
			return reconcile.Result{}, nil
		}
		if err := a.o.Catalog.DeleteSnapshot(opCtx, snap.Name); err != nil && !errors.Is(err, catalog.ErrNotFound) {
			log.Error(err, "delete snapshot")
			a.warn(&snap, "DeleteFailed", err)
			snap.Status.Phase, snap.Status.Error = v1alpha1.Deleting, opError(err)
			if serr := a.c.Status().Update(ctx, &snap); serr != nil {
				log.Error(serr, "report the failure")
			}
			return reconcile.Result{}, err
		}
		return reconcile.Result{}, a.removeFinalizer(ctx, &snap)
	}
	if err := a.ensureFinalizer(ctx, &snap); err != nil {
		return reconcile.Result{}, err
	}
	if settled(snap.Generation, snap.Status.ObservedGeneration, snap.Status.Phase, snap.Status.Error) {
		return reconcile.Result{}, nil
	}
	t0 := time.Now()
	s, err := a.o.Catalog.CreateSnapshotWithID(opCtx, snap.Name, snap.Spec.Name, snap.Spec.SourceVolume)
	st := v1alpha1.PloopSnapshotStatus{ObservedGeneration: snap.Generation}
	if err != nil {
		log.Error(err, "snapshot failed", "took", time.Since(t0))
		a.warn(&snap, "OperationFailed", err)
		st.Phase, st.Error = v1alpha1.Failed, opError(err)
	} else {
		log.V(2).Info("snapshot ready", "source", s.SourceVolume, "took", time.Since(t0))
		created := metav1.NewTime(s.Created)
		st.Phase, st.SnapshotID, st.ReadyToUse, st.CreationTime = v1alpha1.Ready, s.ID, true, &created
		st.Size = resource.NewQuantity(s.Size, resource.BinarySI)
	}
	a.capacity.changed()
	snap.Status = st
	if uerr := a.c.Status().Update(ctx, &snap); uerr != nil {
		return reconcile.Result{}, fmt.Errorf("report snapshot %s: %w", snap.Name, uerr)
	}
	return outcome(err)
}

// bytesOf is a quantity as a byte count: whole, not negative, within int64.
func bytesOf(what string, q resource.Quantity) (int64, error) {
	if q.Sign() < 0 || q.AsApproximateFloat64() >= math.MaxInt64 {
		return 0, fmt.Errorf("%s %s: want a byte count from 0 to %d: %w", what, q.String(), int64(math.MaxInt64), catalog.ErrInvalid)
	}
	return q.Value(), nil
}

func logFrom(ctx context.Context) logr.Logger { return ctrl.LoggerFrom(ctx) }
