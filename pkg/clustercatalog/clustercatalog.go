// Package clustercatalog is the cluster's storage catalogue as the
// controller sees it when every node has a storage root of its own
// (DESIGN.md §3): it creates, grows and deletes volumes and snapshots by
// writing PloopVolume and PloopSnapshot resources for the owning node and
// waiting for the status that node's agent (package nodeagent) reports.
//
// The controller names each object before the node creates it: the
// resource's name is the volume or snapshot id (catalog.NewVolumeID), so
// the CSI handle, the resource and the node's record agree from the start
// and a delete needs nothing but the id. Creation is idempotent by the CSI
// name through a label holding the name's hash. A wait is bounded by the
// caller's context: when it ends first the call returns its error
// (DeadlineExceeded), the resource stays, and the CO's retry finds it and
// waits again. A permanent failure (no capacity, invalid, out of range)
// deletes the resource it came from, so that a retry, perhaps on another
// node, starts clean. Errors carry the catalogue's classes, so the CSI
// layer maps them exactly as it maps a local catalogue's.
//
// On a shared root (one filesystem at the same path on every node) the
// controller owns the root's catalogue instead, and Shared and
// SharedOnline (shared.go) keep the resources beside it and route the
// online operations of a served volume to the node serving it.
package clustercatalog

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

// NameLabel holds a hash of the CSI name of a volume or snapshot, which
// may be longer than a label value or hold bytes a label cannot.
const NameLabel = "ploop.io/name-hash"

// DefaultPoll is how often a wait looks at the resource again.
const DefaultPoll = 100 * time.Millisecond

// Catalog reaches every node's catalogue through the API server.
type Catalog struct {
	c    client.Client
	r    client.Reader
	poll time.Duration
}

// Options configure a Catalog.
type Options struct {
	// Poll is how often a wait reads the resource; default DefaultPoll.
	Poll time.Duration
	// Reader, when set, serves every read instead of the client: a
	// manager's cached client would not yet see what this catalogue has
	// just written, so a controller passes the manager's API reader.
	Reader client.Reader
}

// New returns a Catalog that writes through c.
func New(c client.Client, o Options) *Catalog {
	o = o.withDefaults(c)
	return &Catalog{c: c, r: o.Reader, poll: o.Poll}
}

func (o Options) withDefaults(c client.Client) Options {
	if o.Poll <= 0 {
		o.Poll = DefaultPoll
	}
	if o.Reader == nil {
		o.Reader = c
	}
	return o
}

func nameHash(name string) string {
	h := sha256.Sum256([]byte(name))
	return hex.EncodeToString(h[:20])
}

// apiError classifies an API server failure: the API server is how the
// controller reaches the node, so failing to talk to it is Unavailable.
//
// Near the caller's deadline client-go's rate limiter refuses a request it
// could not send in time ("would exceed context deadline") before the
// context itself ends; that, like an ended context, is the deadline, which
// the CO retries as such.
func apiError(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil || strings.Contains(err.Error(), "would exceed context deadline") {
		return fmt.Errorf("%s: %w (%v)", what, context.DeadlineExceeded, err)
	}
	return fmt.Errorf("%s: %w: %w", what, catalog.ErrUnavailable, err)
}

// CreateVolumeOn creates the volume req describes on node's storage root
// and waits for the node, or returns the volume an earlier request of the
// same name made.
func (c *Catalog) CreateVolumeOn(ctx context.Context, node string, req catalog.VolumeRequest) (catalog.Volume, error) {
	if node == "" {
		return catalog.Volume{}, fmt.Errorf("create volume %q: no node named: %w", req.Name, catalog.ErrInvalid)
	}
	if req.Type == "" {
		req.Type = catalog.Ploop
	}
	want := volumeSpec(node, req)
	vol, err := c.volumeByName(ctx, req.Name)
	if err != nil {
		return catalog.Volume{}, err
	}
	if vol == nil {
		id := req.ID
		if id == "" {
			id = catalog.NewVolumeID(req.Type)
		}
		vol = &v1alpha1.PloopVolume{
			ObjectMeta: metav1.ObjectMeta{Name: id, Finalizers: []string{v1alpha1.Finalizer},
				Labels: map[string]string{v1alpha1.NodeLabel: node, NameLabel: nameHash(req.Name)}},
			Spec: want,
		}
		if err := c.c.Create(ctx, vol); err != nil {
			if apierrors.IsInvalid(err) {
				return catalog.Volume{}, fmt.Errorf("create volume %q: %w: %w", req.Name, catalog.ErrInvalid, err)
			}
			return catalog.Volume{}, apiError(ctx, fmt.Sprintf("create volume %q", req.Name), err)
		}
	} else if diff := specDiff(vol.Spec, want); diff != "" {
		return catalog.Volume{}, fmt.Errorf("create volume %q: volume %s exists with other parameters (%s): %w", req.Name, vol.Name, diff, catalog.ErrExists)
	}
	return c.waitVolume(ctx, vol.Name, vol.Generation, true)
}

// volumeSpec is the spec that asks node for req.
func volumeSpec(node string, req catalog.VolumeRequest) v1alpha1.PloopVolumeSpec {
	s := v1alpha1.PloopVolumeSpec{
		Name: req.Name, NodeName: node, Type: string(req.Type), Size: *resource.NewQuantity(req.RequiredBytes, resource.BinarySI),
		FSType: req.FSType, ClusterSize: req.ClusterSize, MkfsOptions: req.MkfsOptions, Inodes: int64(req.Inodes), Discard: req.Discard,
	}
	if req.LimitBytes > 0 {
		s.Limit = resource.NewQuantity(req.LimitBytes, resource.BinarySI)
	}
	if req.SourceSnapshot != "" || req.SourceVolume != "" {
		s.Source = &v1alpha1.VolumeSource{Snapshot: req.SourceSnapshot, Volume: req.SourceVolume}
	}
	return s
}

// specDiff names the first field in which an existing volume's spec
// differs from a repeated request's; "" when the request is the same.
func specDiff(have, want v1alpha1.PloopVolumeSpec) string {
	qty := func(q *resource.Quantity) int64 {
		if q == nil {
			return 0
		}
		return q.Value()
	}
	src := func(s *v1alpha1.VolumeSource) v1alpha1.VolumeSource {
		if s == nil {
			return v1alpha1.VolumeSource{}
		}
		return *s
	}
	switch {
	case have.NodeName != want.NodeName:
		return fmt.Sprintf("on node %s, not %s", have.NodeName, want.NodeName)
	case have.Type != want.Type:
		return "type " + have.Type
	case have.FSType != want.FSType:
		return "filesystem " + have.FSType
	case have.ClusterSize != want.ClusterSize || have.MkfsOptions != want.MkfsOptions ||
		have.Inodes != want.Inodes || have.Discard != want.Discard:
		return "parameters"
	case src(have.Source) != src(want.Source):
		return "content source"
	case want.Size.Value() != 0 && have.Size.Value() != want.Size.Value():
		return "size " + have.Size.String()
	case qty(have.Limit) != qty(want.Limit):
		return "limit"
	}
	return ""
}

func (c *Catalog) volumeByName(ctx context.Context, name string) (*v1alpha1.PloopVolume, error) {
	var list v1alpha1.PloopVolumeList
	if err := c.r.List(ctx, &list, client.MatchingLabels{NameLabel: nameHash(name)}); err != nil {
		return nil, apiError(ctx, fmt.Sprintf("find volume %q", name), err)
	}
	for i := range list.Items {
		if list.Items[i].Spec.Name == name && list.Items[i].DeletionTimestamp.IsZero() {
			return &list.Items[i], nil
		}
	}
	for i := range list.Items {
		if list.Items[i].Spec.Name == name {
			// Being deleted after a permanent failure: the retry must wait
			// until the old attempt is gone.
			return nil, fmt.Errorf("volume %q: an earlier attempt (%s) is still being deleted: %w", name, list.Items[i].Name, catalog.ErrBusy)
		}
	}
	return nil, nil
}

// waitVolume waits until the node reports on generation gen (or a later
// one) of volume id. With dropFailed, a permanent failure deletes the
// resource.
func (c *Catalog) waitVolume(ctx context.Context, id string, gen int64, dropFailed bool) (catalog.Volume, error) {
	var vol v1alpha1.PloopVolume
	for {
		if err := c.r.Get(ctx, client.ObjectKey{Name: id}, &vol); err != nil {
			if apierrors.IsNotFound(err) {
				return catalog.Volume{}, fmt.Errorf("volume %s: %w", id, catalog.ErrNotFound)
			}
			return catalog.Volume{}, apiError(ctx, "read volume "+id, err)
		}
		st := vol.Status
		if st.ObservedGeneration >= gen && vol.Generation == st.ObservedGeneration {
			switch st.Phase {
			case v1alpha1.Ready:
				return toVolume(&vol), nil
			case v1alpha1.Failed:
				err := nodeError(vol.Spec.NodeName, st.Error)
				if dropFailed && catalog.Permanent(err) {
					if derr := c.c.Delete(ctx, &vol); derr != nil && !apierrors.IsNotFound(derr) {
						err = errors.Join(err, apiError(ctx, "drop the failed volume "+id, derr))
					}
				}
				return catalog.Volume{}, err
			}
		}
		if err := c.sleep(ctx); err != nil {
			return catalog.Volume{}, fmt.Errorf("volume %s: waiting for node %s: %w", id, vol.Spec.NodeName, err)
		}
	}
}

func (c *Catalog) sleep(ctx context.Context) error { return sleep(ctx, c.poll) }

// nodeError is the error a node reported, with its class.
func nodeError(node string, e *v1alpha1.OperationError) error {
	if e == nil {
		return fmt.Errorf("node %s reported a failure without a reason", node)
	}
	return catalog.FromClass(e.Code, fmt.Sprintf("node %s: %s", node, e.Message))
}

func toVolume(v *v1alpha1.PloopVolume) catalog.Volume {
	out := catalog.Volume{ID: v.Name, Name: v.Spec.Name, Type: catalog.Type(v.Spec.Type), FSType: v.Spec.FSType,
		ClusterSize: v.Spec.ClusterSize, MkfsOptions: v.Spec.MkfsOptions, Inodes: uint64(v.Spec.Inodes), Discard: v.Spec.Discard,
		Node: v.Spec.NodeName, Created: v.CreationTimestamp.UTC()}
	if v.Status.Size != nil {
		out.Size = v.Status.Size.Value()
	}
	// The node's catalogue fills in defaults (ext4, 1 MiB clusters, an
	// inode limit from the size); the volume context must say what the
	// node will check it against.
	if e := v.Status.Effective; e != nil {
		out.FSType, out.ClusterSize, out.MkfsOptions, out.Inodes, out.Discard = e.FSType, e.ClusterSize, e.MkfsOptions, uint64(e.Inodes), e.Discard
	}
	if v.Spec.Source != nil {
		out.SourceSnapshot, out.SourceVolume = v.Spec.Source.Snapshot, v.Spec.Source.Volume
	}
	return out
}

// getVolume reads the resource of a volume id.
func (c *Catalog) getVolume(ctx context.Context, id string) (*v1alpha1.PloopVolume, error) {
	if _, err := catalog.ParseVolumeID(id); err != nil {
		return nil, err
	}
	var vol v1alpha1.PloopVolume
	if err := c.r.Get(ctx, client.ObjectKey{Name: id}, &vol); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("volume %s: %w", id, catalog.ErrNotFound)
		}
		return nil, apiError(ctx, "read volume "+id, err)
	}
	return &vol, nil
}

// GetVolume returns a volume that its node reported ready.
func (c *Catalog) GetVolume(ctx context.Context, id string) (catalog.Volume, error) {
	vol, err := c.getVolume(ctx, id)
	if err != nil {
		return catalog.Volume{}, err
	}
	if vol.Status.Phase != v1alpha1.Ready && vol.Status.VolumeID == "" {
		return catalog.Volume{}, fmt.Errorf("volume %s is not created yet (%s): %w", id, vol.Status.Phase, catalog.ErrNotFound)
	}
	return toVolume(vol), nil
}

// DeleteVolume deletes a volume's resource and waits until its node has
// removed the volume and let the resource go. An unknown id succeeds.
func (c *Catalog) DeleteVolume(ctx context.Context, id string) error {
	vol, err := c.getVolume(ctx, id)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if vol.DeletionTimestamp.IsZero() {
		if err := c.c.Delete(ctx, vol); err != nil && !apierrors.IsNotFound(err) {
			return apiError(ctx, "delete volume "+id, err)
		}
	}
	return c.waitGone(ctx, vol)
}

// waitGone waits until obj is gone; when the context ends first, the
// node's last reported failure (such as InUse) says why.
func (c *Catalog) waitGone(ctx context.Context, obj client.Object) error {
	for {
		err := c.r.Get(ctx, client.ObjectKeyFromObject(obj), obj)
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return apiError(ctx, "read "+obj.GetName(), err)
		}
		if err := c.sleep(ctx); err != nil {
			if e := lastError(obj); e != nil {
				return fmt.Errorf("delete %s: %w", obj.GetName(), nodeError(nodeOf(obj), e))
			}
			return fmt.Errorf("delete %s: waiting for node %s: %w", obj.GetName(), nodeOf(obj), err)
		}
	}
}

func lastError(obj client.Object) *v1alpha1.OperationError {
	switch o := obj.(type) {
	case *v1alpha1.PloopVolume:
		return o.Status.Error
	case *v1alpha1.PloopSnapshot:
		return o.Status.Error
	}
	return nil
}

func nodeOf(obj client.Object) string { return obj.GetLabels()[v1alpha1.NodeLabel] }

// ExpandVolume asks the volume's node to grow it to at least required
// bytes (within limit, 0 for none) and waits; it returns the new size and
// whether the node must still grow the filesystem.
func (c *Catalog) ExpandVolume(ctx context.Context, id string, required, limit int64) (int64, bool, error) {
	if required <= 0 || limit > 0 && required > limit {
		return 0, false, fmt.Errorf("expand volume %s: capacity range [%d, %d]: %w", id, required, limit, catalog.ErrInvalid)
	}
	var gen int64
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		vol, err := c.getVolume(ctx, id)
		if err != nil {
			return err
		}
		gen = vol.Generation
		if vol.Spec.Size.Value() >= required {
			return nil
		}
		vol.Spec.Size = *resource.NewQuantity(required, resource.BinarySI)
		if limit > 0 {
			vol.Spec.Limit = resource.NewQuantity(limit, resource.BinarySI)
		} else {
			vol.Spec.Limit = nil
		}
		if err := c.c.Update(ctx, vol); err != nil {
			return err
		}
		gen = vol.Generation
		return nil
	})
	if err != nil {
		if catalog.ClassOf(err) == "" && !errors.Is(err, context.DeadlineExceeded) {
			err = apiError(ctx, "update volume "+id, err) // the Update's own error
		}
		return 0, false, fmt.Errorf("expand volume %s: %w", id, err)
	}
	v, err := c.waitVolume(ctx, id, gen, false)
	if err != nil {
		return 0, false, fmt.Errorf("expand volume %s: %w", id, err)
	}
	var vol v1alpha1.PloopVolume
	if err := c.r.Get(ctx, client.ObjectKey{Name: id}, &vol); err != nil {
		return 0, false, apiError(ctx, "read volume "+id, err)
	}
	return v.Size, vol.Status.NodeExpansionRequired, nil
}

// ListVolumes lists the volumes their nodes reported ready, in id order
// after the volume the token names.
func (c *Catalog) ListVolumes(ctx context.Context, token string, max int) ([]catalog.Volume, string, error) {
	if token != "" {
		if _, err := catalog.ParseVolumeID(token); err != nil {
			return nil, "", fmt.Errorf("list token %q: %w", token, catalog.ErrBadToken)
		}
	}
	var list v1alpha1.PloopVolumeList
	if err := c.r.List(ctx, &list); err != nil {
		return nil, "", apiError(ctx, "list volumes", err)
	}
	slices.SortFunc(list.Items, func(a, b v1alpha1.PloopVolume) int { return strings.Compare(a.Name, b.Name) })
	var out []catalog.Volume
	for i := range list.Items {
		v := &list.Items[i]
		if v.Name <= token || v.Status.VolumeID == "" {
			continue
		}
		if max > 0 && len(out) == max {
			return out, out[len(out)-1].ID, nil
		}
		out = append(out, toVolume(v))
	}
	return out, "", nil
}

// CreateSnapshot snapshots a volume on the node that holds it and waits,
// or returns the snapshot an earlier request of the same name made.
func (c *Catalog) CreateSnapshot(ctx context.Context, name, sourceVolume string) (catalog.Snapshot, error) {
	src, err := c.getVolume(ctx, sourceVolume)
	if err != nil {
		return catalog.Snapshot{}, fmt.Errorf("create snapshot %q: source volume: %w", name, err)
	}
	snap, err := c.snapshotByName(ctx, name)
	if err != nil {
		return catalog.Snapshot{}, err
	}
	if snap == nil {
		snap = &v1alpha1.PloopSnapshot{
			ObjectMeta: metav1.ObjectMeta{Name: catalog.NewSnapshotID(), Finalizers: []string{v1alpha1.Finalizer},
				Labels: map[string]string{v1alpha1.NodeLabel: src.Spec.NodeName, NameLabel: nameHash(name)}},
			Spec: v1alpha1.PloopSnapshotSpec{Name: name, NodeName: src.Spec.NodeName, SourceVolume: sourceVolume},
		}
		if err := c.c.Create(ctx, snap); err != nil {
			return catalog.Snapshot{}, apiError(ctx, fmt.Sprintf("create snapshot %q", name), err)
		}
	} else if snap.Spec.SourceVolume != sourceVolume {
		return catalog.Snapshot{}, fmt.Errorf("snapshot %s exists for volume %s: %w", snap.Name, snap.Spec.SourceVolume, catalog.ErrExists)
	}
	for {
		if err := c.r.Get(ctx, client.ObjectKeyFromObject(snap), snap); err != nil {
			if apierrors.IsNotFound(err) {
				return catalog.Snapshot{}, fmt.Errorf("snapshot %s: %w", snap.Name, catalog.ErrNotFound)
			}
			return catalog.Snapshot{}, apiError(ctx, "read snapshot "+snap.Name, err)
		}
		if st := snap.Status; st.ObservedGeneration == snap.Generation {
			switch st.Phase {
			case v1alpha1.Ready:
				return toSnapshot(snap), nil
			case v1alpha1.Failed:
				err := nodeError(snap.Spec.NodeName, st.Error)
				if catalog.Permanent(err) {
					if derr := c.c.Delete(ctx, snap); derr != nil && !apierrors.IsNotFound(derr) {
						err = errors.Join(err, apiError(ctx, "drop the failed snapshot "+snap.Name, derr))
					}
				}
				return catalog.Snapshot{}, err
			}
		}
		if err := c.sleep(ctx); err != nil {
			return catalog.Snapshot{}, fmt.Errorf("snapshot %s: waiting for node %s: %w", snap.Name, snap.Spec.NodeName, err)
		}
	}
}

func (c *Catalog) snapshotByName(ctx context.Context, name string) (*v1alpha1.PloopSnapshot, error) {
	var list v1alpha1.PloopSnapshotList
	if err := c.r.List(ctx, &list, client.MatchingLabels{NameLabel: nameHash(name)}); err != nil {
		return nil, apiError(ctx, fmt.Sprintf("find snapshot %q", name), err)
	}
	for i := range list.Items {
		if list.Items[i].Spec.Name != name {
			continue
		}
		if !list.Items[i].DeletionTimestamp.IsZero() {
			return nil, fmt.Errorf("snapshot %q: an earlier attempt (%s) is still being deleted: %w", name, list.Items[i].Name, catalog.ErrBusy)
		}
		return &list.Items[i], nil
	}
	return nil, nil
}

func toSnapshot(s *v1alpha1.PloopSnapshot) catalog.Snapshot {
	out := catalog.Snapshot{ID: s.Name, Name: s.Spec.Name, SourceVolume: s.Spec.SourceVolume, Created: s.CreationTimestamp.UTC(), Node: s.Spec.NodeName}
	if s.Status.Size != nil {
		out.Size = s.Status.Size.Value()
	}
	if s.Status.CreationTime != nil {
		out.Created = s.Status.CreationTime.UTC()
	}
	if t, err := catalog.ParseVolumeID(s.Spec.SourceVolume); err == nil {
		out.Type = t
	}
	return out
}

func (c *Catalog) getSnapshot(ctx context.Context, id string) (*v1alpha1.PloopSnapshot, error) {
	if err := catalog.ValidateSnapshotID(id); err != nil {
		return nil, err
	}
	var snap v1alpha1.PloopSnapshot
	if err := c.r.Get(ctx, client.ObjectKey{Name: id}, &snap); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("snapshot %s: %w", id, catalog.ErrNotFound)
		}
		return nil, apiError(ctx, "read snapshot "+id, err)
	}
	return &snap, nil
}

// GetSnapshot returns a snapshot its node reported ready.
func (c *Catalog) GetSnapshot(ctx context.Context, id string) (catalog.Snapshot, error) {
	snap, err := c.getSnapshot(ctx, id)
	if err != nil {
		return catalog.Snapshot{}, err
	}
	if !snap.Status.ReadyToUse {
		return catalog.Snapshot{}, fmt.Errorf("snapshot %s is not taken yet (%s): %w", id, snap.Status.Phase, catalog.ErrNotFound)
	}
	return toSnapshot(snap), nil
}

// DeleteSnapshot deletes a snapshot's resource and waits until its node
// has removed it. An unknown id succeeds.
func (c *Catalog) DeleteSnapshot(ctx context.Context, id string) error {
	snap, err := c.getSnapshot(ctx, id)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if snap.DeletionTimestamp.IsZero() {
		if err := c.c.Delete(ctx, snap); err != nil && !apierrors.IsNotFound(err) {
			return apiError(ctx, "delete snapshot "+id, err)
		}
	}
	return c.waitGone(ctx, snap)
}

// ListSnapshots lists the snapshots their nodes reported ready that match
// the filter, in id order after the snapshot the token names.
func (c *Catalog) ListSnapshots(ctx context.Context, f catalog.SnapshotFilter, token string, max int) ([]catalog.Snapshot, string, error) {
	if token != "" {
		if err := catalog.ValidateSnapshotID(token); err != nil {
			return nil, "", fmt.Errorf("list token %q: %w", token, catalog.ErrBadToken)
		}
	}
	var list v1alpha1.PloopSnapshotList
	if err := c.r.List(ctx, &list); err != nil {
		return nil, "", apiError(ctx, "list snapshots", err)
	}
	slices.SortFunc(list.Items, func(a, b v1alpha1.PloopSnapshot) int { return strings.Compare(a.Name, b.Name) })
	var out []catalog.Snapshot
	for i := range list.Items {
		s := &list.Items[i]
		if s.Name <= token || !s.Status.ReadyToUse ||
			f.SnapshotID != "" && s.Name != f.SnapshotID || f.SourceVolume != "" && s.Spec.SourceVolume != f.SourceVolume {
			continue
		}
		if max > 0 && len(out) == max {
			return out, out[len(out)-1].ID, nil
		}
		out = append(out, toSnapshot(s))
	}
	return out, "", nil
}

// CapacityOn is what node's storage root can still promise to volumes of
// type typ, as the node last published it on its Node object (package
// nodeagent). A node that has published nothing (not running, or not ours)
// promises nothing.
func (c *Catalog) CapacityOn(ctx context.Context, node string, typ catalog.Type) (catalog.Capacity, error) {
	if typ == "" {
		typ = catalog.Ploop
	}
	var n corev1.Node
	if err := c.r.Get(ctx, client.ObjectKey{Name: node}, &n); err != nil {
		if apierrors.IsNotFound(err) {
			return catalog.Capacity{}, nil
		}
		return catalog.Capacity{}, apiError(ctx, "read node "+node, err)
	}
	v, ok := n.Annotations[v1alpha1.CapacityAnnotation+string(typ)]
	if !ok {
		return catalog.Capacity{}, nil
	}
	avail, err := strconv.ParseInt(v, 10, 64)
	if err != nil || avail < 0 {
		return catalog.Capacity{}, fmt.Errorf("node %s publishes capacity %q for %s: want a byte count: %w", node, v, typ, catalog.ErrUnavailable)
	}
	return catalog.Capacity{AvailableBytes: avail}, nil
}

// Capacity is the sum of what every node published for typ: the
// capacity of the cluster as a whole, for a GetCapacity that names no
// node.
func (c *Catalog) Capacity(ctx context.Context, typ catalog.Type) (catalog.Capacity, error) {
	var nodes corev1.NodeList
	if err := c.r.List(ctx, &nodes); err != nil {
		return catalog.Capacity{}, apiError(ctx, "list nodes", err)
	}
	var sum catalog.Capacity
	for _, n := range nodes.Items {
		nc, err := c.CapacityOn(ctx, n.Name, typ)
		if err != nil {
			continue // a malformed annotation promises nothing
		}
		sum.AvailableBytes += nc.AvailableBytes
	}
	return sum, nil
}

// Root names what the catalogue spans, for logs.
func (c *Catalog) Root() string { return "the nodes' storage roots, through the API server" }

// Health reports whether the API server, through which every node is
// reached, answers.
func (c *Catalog) Health(ctx context.Context) error {
	var list v1alpha1.PloopVolumeList
	if err := c.r.List(ctx, &list, client.Limit(1)); err != nil {
		return apiError(ctx, "reach the API server", err)
	}
	return nil
}

// Condition reports a volume's last known state from its node: a failed
// operation is abnormal, with the node's message.
func (c *Catalog) Condition(ctx context.Context, id string) (catalog.Condition, error) {
	vol, err := c.getVolume(ctx, id)
	if err != nil {
		return catalog.Condition{}, err
	}
	switch st := vol.Status; {
	case st.Phase == v1alpha1.Failed && st.Error != nil:
		return catalog.Condition{Abnormal: true, Message: fmt.Sprintf("node %s: the last operation failed: %s", vol.Spec.NodeName, st.Error.Message)}, nil
	case st.Phase == v1alpha1.Deleting && st.Error != nil:
		return catalog.Condition{Abnormal: true, Message: fmt.Sprintf("node %s cannot delete the volume: %s", vol.Spec.NodeName, st.Error.Message)}, nil
	}
	return catalog.Condition{}, nil
}

// VolumePath fails: volumes are on the nodes, and only node services,
// which a controller does not run, need their paths.
func (c *Catalog) VolumePath(id string) (string, error) {
	return "", fmt.Errorf("volume %s: paths are the nodes' own: %w", id, catalog.ErrUnavailable)
}

// Tidy does nothing: each node tidies its own root.
func (c *Catalog) Tidy(ctx context.Context) error { return nil }

// CreateVolume without a node cannot choose where the volume lives; the
// controller calls CreateVolumeOn with the node its topology names.
func (c *Catalog) CreateVolume(ctx context.Context, req catalog.VolumeRequest) (catalog.Volume, error) {
	return catalog.Volume{}, fmt.Errorf("create volume %q: a volume of the cluster needs a node (CreateVolumeOn): %w", req.Name, catalog.ErrInvalid)
}
