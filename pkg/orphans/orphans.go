// Package orphans finds the volumes of a cluster that lost their other
// half: a PloopVolume (an image on a node's root) that no PersistentVolume
// uses, and a PersistentVolume of the driver that no PloopVolume backs.
// Either is a leak or a dangling claim an operator should see, and neither
// can be told from a half-finished provisioning by looking once: a volume
// is created before its PersistentVolume, so a volume counts as an orphan
// only once it is older than a grace period.
//
// The reporter runs in the elected controller. Each scan records an Event
// on every orphan (on the PloopVolume, or on the PersistentVolume) and sets
// the ploop_csi_orphans gauge. It deletes nothing unless told to, and then
// only orphaned PloopVolumes (their node then removes the image); a
// PersistentVolume is the CO's, never the driver's to delete. Resources
// whose node no longer exists are reported too (kind stranded): their
// finalizers hold them until an operator lets them go.
package orphans

import (
	"context"
	"fmt"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
)

// Defaults.
const (
	DefaultInterval = 10 * time.Minute
	DefaultGrace    = time.Hour
)

// Options configure a Reporter.
type Options struct {
	// Driver is the CSI driver name PersistentVolumes must carry.
	Driver string
	// Reader lists; Writer deletes orphans (with Delete).
	Reader client.Reader
	Writer client.Writer
	// Recorder gets one Warning Event per orphan and scan.
	Recorder record.EventRecorder
	// Registerer, when set, gets the ploop_csi_orphans gauge.
	Registerer prometheus.Registerer
	// Interval between scans (DefaultInterval); Grace is how old a
	// PloopVolume must be before a missing PersistentVolume makes it an
	// orphan (DefaultGrace).
	Interval, Grace time.Duration
	// Delete removes orphaned PloopVolumes (--delete-orphans).
	Delete bool
	// DeleteVolume, when set, is how Delete removes an orphan instead of
	// deleting its PloopVolume: on a shared root the controller's own
	// catalogue deletes the volume, and then its resource.
	DeleteVolume func(ctx context.Context, id string) error
	Logger       logr.Logger
}

// Reporter scans for orphans (a manager.Runnable that needs the lease).
type Reporter struct {
	o     Options
	gauge *prometheus.GaugeVec
	now   func() time.Time
}

// Report is what one scan found: ids of PloopVolumes without a
// PersistentVolume, names of PersistentVolumes without a PloopVolume, and
// the resources (volumes and snapshots) whose node no longer exists.
type Report struct {
	Volumes           []string
	PersistentVolumes []string
	Deleted           []string
	Stranded          []string
}

// New returns a Reporter, its gauge registered.
func New(o Options) (*Reporter, error) {
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.Grace < 0 {
		o.Grace = 0
	} else if o.Grace == 0 {
		o.Grace = DefaultGrace
	}
	r := &Reporter{o: o, now: time.Now, gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "ploop_csi", Name: "orphans",
		Help: "Orphans the last scan found: kind=volume, PloopVolumes no PersistentVolume uses; kind=persistentvolume, the driver's PersistentVolumes no PloopVolume backs; " +
			"kind=stranded, PloopVolumes and PloopSnapshots whose node no longer exists.",
	}, []string{"kind"})}
	if o.Registerer != nil {
		if err := o.Registerer.Register(r.gauge); err != nil {
			return nil, fmt.Errorf("orphans: %w", err)
		}
	}
	return r, nil
}

// NoGrace makes a scan count every PloopVolume without a PersistentVolume,
// however young (tests).
const NoGrace = -1

// Start scans at once and then every interval until ctx ends.
func (r *Reporter) Start(ctx context.Context) error {
	t := time.NewTicker(r.o.Interval)
	defer t.Stop()
	for {
		if _, err := r.Scan(ctx); err != nil && ctx.Err() == nil {
			r.o.Logger.Error(err, "orphan scan failed; retrying at the next interval")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// NeedLeaderElection: one controller replica reports.
func (r *Reporter) NeedLeaderElection() bool { return true }

// Scan looks once.
func (r *Reporter) Scan(ctx context.Context) (Report, error) {
	var pvs corev1.PersistentVolumeList
	if err := r.o.Reader.List(ctx, &pvs); err != nil {
		return Report{}, fmt.Errorf("list persistent volumes: %w", err)
	}
	var vols v1alpha1.PloopVolumeList
	if err := r.o.Reader.List(ctx, &vols); err != nil {
		return Report{}, fmt.Errorf("list ploop volumes: %w", err)
	}
	var snaps v1alpha1.PloopSnapshotList
	if err := r.o.Reader.List(ctx, &snaps); err != nil {
		return Report{}, fmt.Errorf("list ploop snapshots: %w", err)
	}
	var nodes corev1.NodeList
	if err := r.o.Reader.List(ctx, &nodes); err != nil {
		return Report{}, fmt.Errorf("list nodes: %w", err)
	}
	known := map[string]bool{}
	for _, n := range nodes.Items {
		known[n.Name] = true
	}
	handles := map[string]bool{}
	for _, pv := range pvs.Items {
		if csi := pv.Spec.CSI; csi != nil && csi.Driver == r.o.Driver {
			handles[csi.VolumeHandle] = true
		}
	}
	ours := map[string]bool{}
	var rep Report
	for i := range vols.Items {
		v := &vols.Items[i]
		ours[v.Name] = true
		young := r.o.Grace > 0 && r.now().Sub(v.CreationTimestamp.Time) < r.o.Grace
		if handles[v.Name] || young || !v.DeletionTimestamp.IsZero() || v.Status.Phase != v1alpha1.Ready {
			continue
		}
		rep.Volumes = append(rep.Volumes, v.Name)
		if r.o.Delete {
			del := func() error { return r.o.Writer.Delete(ctx, v) }
			if r.o.DeleteVolume != nil {
				del = func() error { return r.o.DeleteVolume(ctx, v.Name) }
			}
			if err := del(); err != nil && !apierrors.IsNotFound(err) {
				return rep, fmt.Errorf("delete orphaned volume %s: %w", v.Name, err)
			}
			rep.Deleted = append(rep.Deleted, v.Name)
			r.event(v, "OrphanDeleted", "no PersistentVolume uses this volume (%s on node %s); deleted by --delete-orphans", v.Spec.Name, v.Spec.NodeName)
			continue
		}
		r.event(v, "Orphan", "no PersistentVolume uses this volume (%s on node %s): its image takes space on the node. "+
			"Delete it with kubectl delete ploopvolume %s if it is not needed, or run the controller with --delete-orphans", v.Spec.Name, v.Spec.NodeName, v.Name)
	}
	for i := range pvs.Items {
		pv := &pvs.Items[i]
		if csi := pv.Spec.CSI; csi == nil || csi.Driver != r.o.Driver || ours[csi.VolumeHandle] {
			continue
		}
		rep.PersistentVolumes = append(rep.PersistentVolumes, pv.Name)
		r.event(pv, "Orphan", "no PloopVolume backs volume %s: its data is gone or was never created by this cluster's driver; pods that use it will not start", pv.Spec.CSI.VolumeHandle)
	}
	// A node that is gone for good leaves its resources behind, held by
	// their finalizers: nothing but an operator can release them (and the
	// images with them, if the node's disk is gone too).
	stranded := func(obj client.Object, node string) {
		if node == "" || known[node] {
			return
		}
		rep.Stranded = append(rep.Stranded, obj.GetName())
		r.event(obj, "NodeGone", "node %s, which holds this resource's data, no longer exists: nothing can carry out or finish its operations. "+
			"If the node will not come back, remove the finalizer %s (kubectl patch --type=json -p '[{\"op\":\"remove\",\"path\":\"/metadata/finalizers\"}]') and delete the resource", node, v1alpha1.Finalizer)
	}
	for i := range vols.Items {
		v := &vols.Items[i]
		stranded(v, v.Spec.NodeName)
		// On a shared root the data is everyone's, but the record of the
		// node serving the volume keeps it from being deleted and sends
		// its online operations to a node that cannot answer.
		if n := v.Status.AttachedNode; v.Spec.NodeName == "" && n != "" && !known[n] {
			rep.Stranded = append(rep.Stranded, v.Name)
			r.event(v, "NodeGone", "node %s, recorded as serving this volume, no longer exists: the volume cannot be deleted, snapshotted or grown. "+
				"If the node will not come back (its stack lock is then released), clear the record: "+
				"kubectl patch ploopvolume %s --subresource=status --type=merge -p '{\"status\":{\"attachedNode\":null}}'", n, v.Name)
		}
	}
	for i := range snaps.Items {
		stranded(&snaps.Items[i], snaps.Items[i].Spec.NodeName)
	}
	r.gauge.WithLabelValues("stranded").Set(float64(len(rep.Stranded)))
	r.gauge.WithLabelValues("volume").Set(float64(len(rep.Volumes) - len(rep.Deleted)))
	r.gauge.WithLabelValues("persistentvolume").Set(float64(len(rep.PersistentVolumes)))
	return rep, nil
}

func (r *Reporter) event(obj client.Object, reason, format string, args ...any) {
	if r.o.Recorder != nil {
		r.o.Recorder.Eventf(obj, corev1.EventTypeWarning, reason, format, args...)
	}
}

// Unregister removes the gauge from the Registerer it was given.
func (r *Reporter) Unregister() {
	if r.o.Registerer != nil {
		r.o.Registerer.Unregister(r.gauge)
	}
}
