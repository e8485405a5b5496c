package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// On a shared storage root the controller owns the catalogue and makes,
// grows and deletes volumes itself; a node only serves what it stages.
// Two things remain for the node's half: to record on a volume's
// PloopVolume that this node serves it (Reporter, called as a volume is
// staged and unstaged), and to carry out the online operations the
// controller asks of a volume it serves (SetupShared), since only the
// process serving a stack may write it.

// Reporter records which volumes this node serves, in their resources'
// status.attachedNode and the AttachedLabel.
type Reporter struct {
	c    client.Client
	r    client.Reader
	node string
	log  logr.Logger
}

// NewReporter returns the Reporter of node, which writes through c and
// reads through r (the API server: the node's cache holds only the volumes
// it already serves).
func NewReporter(c client.Client, r client.Reader, node string, log logr.Logger) *Reporter {
	return &Reporter{c: c, r: r, node: node, log: log}
}

// Served records that this node serves volume id; the controller then
// sends the volume's online operations here. The node must already hold
// the stack (its lock): the record follows the fact, so a record naming
// another node is stale (that node lost the volume without saying so) and
// is replaced.
func (r *Reporter) Served(ctx context.Context, id string) error {
	var vol v1alpha1.PloopVolume
	if err := r.r.Get(ctx, client.ObjectKey{Name: id}, &vol); err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("record that this node serves %s: it has no PloopVolume, which the controller writes as it creates a volume: %w",
				id, catalog.ErrUnavailable)
		}
		return fmt.Errorf("record that this node serves %s: %w: %w", id, catalog.ErrUnavailable, err)
	}
	if prev := vol.Status.AttachedNode; prev != "" && prev != r.node {
		r.log.Info("replacing a stale record: this node now holds the volume's stack", "volume", id, "recordedNode", prev)
	}
	return r.set(ctx, &vol, r.node)
}

// Released records that this node no longer serves volume id; a record
// naming another node is left alone.
func (r *Reporter) Released(ctx context.Context, id string) error {
	var vol v1alpha1.PloopVolume
	if err := r.r.Get(ctx, client.ObjectKey{Name: id}, &vol); apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return fmt.Errorf("record that this node released %s: %w: %w", id, catalog.ErrUnavailable, err)
	}
	if vol.Status.AttachedNode != r.node && vol.Labels[v1alpha1.AttachedLabel] != r.node {
		return nil
	}
	return r.set(ctx, &vol, "")
}

// set writes node ("" for none) as the volume's serving node: the status
// first, which the controller reads, then the label, which the serving
// node's cache selects on.
func (r *Reporter) set(ctx context.Context, vol *v1alpha1.PloopVolume, node string) error {
	if vol.Status.AttachedNode != node {
		orig := vol.DeepCopy()
		vol.Status.AttachedNode = node
		if err := r.c.Status().Patch(ctx, vol, client.MergeFrom(orig)); err != nil {
			return fmt.Errorf("record node %q as serving %s: %w: %w", node, vol.Name, catalog.ErrUnavailable, err)
		}
	}
	if vol.Labels[v1alpha1.AttachedLabel] != node {
		orig := vol.DeepCopy()
		if node == "" {
			delete(vol.Labels, v1alpha1.AttachedLabel)
		} else {
			if vol.Labels == nil {
				vol.Labels = map[string]string{}
			}
			vol.Labels[v1alpha1.AttachedLabel] = node
		}
		if err := r.c.Patch(ctx, vol, client.MergeFrom(orig)); err != nil {
			return fmt.Errorf("label %s as served by %q: %w: %w", vol.Name, node, catalog.ErrUnavailable, err)
		}
	}
	return nil
}

// SharedOptions configure the node's half on a shared root.
type SharedOptions struct {
	// NodeName is this node's name.
	NodeName string
	// Online runs operations on the stacks this node serves (its
	// attachments).
	Online catalog.Online
	// Recorder, when set, gets a Warning Event on a volume whose online
	// operation failed.
	Recorder record.EventRecorder
	// OperationTimeout bounds one operation; default 5 minutes.
	OperationTimeout time.Duration
}

// SharedCacheOptions make a manager's cache hold only the volumes that
// node serves.
func SharedCacheOptions(node string) cache.Options {
	sel := labels.SelectorFromSet(labels.Set{v1alpha1.AttachedLabel: node})
	return cache.Options{ByObject: map[client.Object]cache.ByObject{
		&v1alpha1.PloopVolume{}: {Label: sel},
	}}
}

// SetupShared registers, with mgr (whose cache should be made with
// SharedCacheOptions), the reconciler that carries out the online
// operations asked of the volumes this node serves and clears the record
// of volumes it no longer serves (after a restart that lost one, or an
// unstage whose record failed). It returns the Reporter that Stage and
// Unstage use.
func SetupShared(mgr ctrl.Manager, o SharedOptions) (*Reporter, error) {
	if o.NodeName == "" || o.Online == nil {
		return nil, errors.New("nodeagent: NodeName and Online are required")
	}
	if o.OperationTimeout <= 0 {
		o.OperationTimeout = 5 * time.Minute
	}
	rep := NewReporter(mgr.GetClient(), mgr.GetAPIReader(), o.NodeName, mgr.GetLogger().WithName("attached"))
	a := &sharedAgent{c: mgr.GetClient(), o: o, rep: rep, answered: map[string]v1alpha1.OnlineResult{}}
	if err := ctrl.NewControllerManagedBy(mgr).Named("ploopvolume-online").For(&v1alpha1.PloopVolume{}).
		Complete(reconcile.Func(a.reconcile)); err != nil {
		return nil, fmt.Errorf("nodeagent: %w", err)
	}
	return rep, nil
}

type sharedAgent struct {
	c   client.Client
	o   SharedOptions
	rep *Reporter

	// answered holds each volume's last answer: the cache may show a
	// request again before it shows the answer, and an operation must
	// not run twice for one request.
	mu       sync.Mutex
	answered map[string]v1alpha1.OnlineResult
}

func (a *sharedAgent) lastAnswer(id string) (v1alpha1.OnlineResult, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, ok := a.answered[id]
	return r, ok
}

func (a *sharedAgent) setAnswer(id string, r *v1alpha1.OnlineResult) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r == nil {
		delete(a.answered, id)
	} else {
		a.answered[id] = *r
	}
}

func (a *sharedAgent) reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var vol v1alpha1.PloopVolume
	if err := a.c.Get(ctx, req.NamespacedName, &vol); err != nil {
		if apierrors.IsNotFound(err) {
			a.setAnswer(req.Name, nil)
		}
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	log := ctrl.LoggerFrom(ctx).WithValues("volume", vol.Name)
	serving, err := a.o.Online.Attached(ctx, vol.Name)
	if err != nil {
		return reconcile.Result{}, err
	}
	if !serving {
		log.Info("clearing the record of a volume this node does not serve")
		a.setAnswer(vol.Name, nil)
		return reconcile.Result{}, a.rep.Released(ctx, vol.Name)
	}
	if vol.Status.AttachedNode != a.o.NodeName {
		return reconcile.Result{}, a.rep.Served(ctx, vol.Name)
	}
	rq := vol.Spec.Online
	if rq == nil || vol.Status.Online != nil && vol.Status.Online.ID == rq.ID {
		return reconcile.Result{}, nil
	}
	res, done := a.lastAnswer(vol.Name)
	if !done || res.ID != rq.ID {
		res = a.run(ctx, &vol, *rq)
		a.setAnswer(vol.Name, &res)
	}
	orig := vol.DeepCopy()
	vol.Status.Online = &res
	if err := a.c.Status().Patch(ctx, &vol, client.MergeFrom(orig)); err != nil {
		return reconcile.Result{}, fmt.Errorf("answer %s of %s: %w", rq.Op, vol.Name, err)
	}
	return reconcile.Result{}, nil
}

// run carries out one request on the served stack.
func (a *sharedAgent) run(ctx context.Context, vol *v1alpha1.PloopVolume, rq v1alpha1.OnlineRequest) v1alpha1.OnlineResult {
	ctx, cancel := context.WithTimeout(ctx, a.o.OperationTimeout)
	defer cancel()
	t0 := time.Now()
	res := v1alpha1.OnlineResult{ID: rq.ID}
	var err error
	switch rq.Op {
	case v1alpha1.OnlineSnapshot:
		res.GUID, err = a.o.Online.Snapshot(ctx, vol.Name)
	case v1alpha1.OnlineDeleteSnapshot:
		err = a.o.Online.DeleteSnapshot(ctx, vol.Name, rq.GUID)
	case v1alpha1.OnlineGrow:
		err = a.o.Online.Grow(ctx, vol.Name, rq.Size)
	case v1alpha1.OnlineCompact:
		err = a.o.Online.Compact(ctx, vol.Name)
	default:
		err = fmt.Errorf("online operation %q: this node knows %s, %s, %s and %s (is the controller newer than the node plugin?): %w",
			rq.Op, v1alpha1.OnlineSnapshot, v1alpha1.OnlineDeleteSnapshot, v1alpha1.OnlineGrow, v1alpha1.OnlineCompact, catalog.ErrInvalid)
	}
	log := ctrl.LoggerFrom(ctx).WithValues("volume", vol.Name, "op", rq.Op, "request", rq.ID, "took", time.Since(t0))
	if err != nil {
		log.Error(err, "online operation failed")
		if a.o.Recorder != nil {
			a.o.Recorder.Event(vol, "Warning", "OnlineOperationFailed", err.Error())
		}
		res.Error = opError(err)
	} else {
		log.V(2).Info("online operation done", "guid", res.GUID)
	}
	return res
}
