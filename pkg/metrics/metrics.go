// Package metrics holds ploop-csi's own Prometheus metrics, which the
// controller-runtime manager serves on /metrics beside its own.
//
// Two kinds: counters that code updates as things happen (CSI calls, by
// method and gRPC code, with their latency), and collectors that read the
// current state when scraped (a node's storage root and its volumes from
// the catalogue; the cluster's custom resources), so that they can never
// drift from what they describe. Every metric is prefixed ploop_csi_; the
// README lists them.
package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

const namespace = "ploop_csi"

// CSI counts CSI calls and their latencies (the driver's Observer).
type CSI struct {
	calls   *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

// NewCSI registers the CSI call metrics with reg.
func NewCSI(reg prometheus.Registerer) (*CSI, error) {
	m := &CSI{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "operations_total",
			Help: "CSI calls answered, by method and gRPC code.",
		}, []string{"method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "operation_duration_seconds",
			Help:    "How long CSI calls took, by method and gRPC code.",
			Buckets: []float64{.001, .005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 120},
		}, []string{"method", "code"}),
	}
	for _, c := range []prometheus.Collector{m.calls, m.latency} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// ObserveCall records one answered call.
func (m *CSI) ObserveCall(method string, code codes.Code, d time.Duration) {
	m.calls.WithLabelValues(method, code.String()).Inc()
	m.latency.WithLabelValues(method, code.String()).Observe(d.Seconds())
}

// StorageSource is what Storage reads of a node's catalogue; a
// *catalog.Catalog is one.
type StorageSource interface {
	ListVolumes(ctx context.Context, token string, max int) ([]catalog.Volume, string, error)
	ListSnapshots(ctx context.Context, f catalog.SnapshotFilter, token string, max int) ([]catalog.Snapshot, string, error)
	VolumeUsage(ctx context.Context, id string) (catalog.Usage, error)
	RootUsage(ctx context.Context) (catalog.RootUsage, error)
}

// Storage is a collector of a node's storage root: its volumes and
// snapshots by type, what each volume was promised against what its data
// occupies, and the root's free space and what it can still promise.
type Storage struct {
	node    string
	src     StorageSource
	timeout time.Duration

	volumes, snapshots                      *prometheus.Desc
	volProvisioned, volAllocated            *prometheus.Desc
	rootProvisioned, rootAllocated          *prometheus.Desc
	rootFree, rootAvailable, scrapeFailures *prometheus.Desc
}

// NewStorage is a Storage for node's catalogue; a scrape reads it for at
// most timeout.
func NewStorage(node string, src StorageSource, timeout time.Duration) *Storage {
	l := prometheus.Labels{"node": node}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, l)
	}
	return &Storage{
		node: node, src: src, timeout: timeout,
		volumes:         d("volumes", "Volumes on the node's storage root, by type.", "type"),
		snapshots:       d("snapshots", "Snapshots on the node's storage root, by type.", "type"),
		volProvisioned:  d("volume_provisioned_bytes", "The size promised to a volume.", "volume", "type"),
		volAllocated:    d("volume_allocated_bytes", "The storage root's space a volume's data occupies (shared deltas counted in each volume).", "volume", "type"),
		rootProvisioned: d("root_provisioned_bytes", "The sizes promised to all volumes of the root."),
		rootAllocated:   d("root_allocated_bytes", "The root's space the volumes and snapshots occupy, each file once."),
		rootFree:        d("root_free_bytes", "Free space of the storage root's filesystem."),
		rootAvailable:   d("root_available_bytes", "What the root can still promise to new volumes: the overcommit headroom."),
		scrapeFailures:  d("storage_scrape_errors", "1 when the last scrape could not read the catalogue (its log says why)."),
	}
}

// Describe implements prometheus.Collector.
func (s *Storage) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{s.volumes, s.snapshots, s.volProvisioned, s.volAllocated,
		s.rootProvisioned, s.rootAllocated, s.rootFree, s.rootAvailable, s.scrapeFailures} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (s *Storage) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	failed := 0.0
	vols, _, err := s.src.ListVolumes(ctx, "", 0)
	if err != nil {
		failed = 1
	}
	byType := map[catalog.Type]int{catalog.Ploop: 0, catalog.Simfs: 0}
	for _, v := range vols {
		byType[v.Type]++
		gauge(s.volProvisioned, float64(v.Size), v.ID, string(v.Type))
		if u, err := s.src.VolumeUsage(ctx, v.ID); err == nil {
			gauge(s.volAllocated, float64(u.AllocatedBytes), v.ID, string(v.Type))
		}
	}
	for t, n := range byType {
		gauge(s.volumes, float64(n), string(t))
	}
	snaps, _, err := s.src.ListSnapshots(ctx, catalog.SnapshotFilter{}, "", 0)
	if err != nil {
		failed = 1
	}
	byType = map[catalog.Type]int{catalog.Ploop: 0, catalog.Simfs: 0}
	for _, sn := range snaps {
		byType[sn.Type]++
	}
	for t, n := range byType {
		gauge(s.snapshots, float64(n), string(t))
	}
	if ru, err := s.src.RootUsage(ctx); err != nil {
		failed = 1
	} else {
		gauge(s.rootProvisioned, float64(ru.ProvisionedBytes))
		gauge(s.rootAllocated, float64(ru.AllocatedBytes))
		gauge(s.rootFree, float64(ru.FreeBytes))
		gauge(s.rootAvailable, float64(ru.AvailableBytes))
	}
	gauge(s.scrapeFailures, failed)
}

// Resources is a collector of the cluster's PloopVolume and PloopSnapshot
// resources by kind, node and phase: the controller's view, in which a
// node that is gone for good shows as resources that stay Pending or
// Deleting on it.
type Resources struct {
	r       client.Reader
	timeout time.Duration
	desc    *prometheus.Desc
	errs    *prometheus.Desc
}

// NewResources is a Resources reading through r.
func NewResources(r client.Reader, timeout time.Duration) *Resources {
	return &Resources{r: r, timeout: timeout,
		desc: prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "resources"),
			"PloopVolume and PloopSnapshot resources by kind, node and phase (an empty phase: not reported on yet).",
			[]string{"kind", "node", "phase"}, nil),
		errs: prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "resources_scrape_errors"),
			"1 when the last scrape could not list the resources.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (m *Resources) Describe(ch chan<- *prometheus.Desc) { ch <- m.desc; ch <- m.errs }

// Collect implements prometheus.Collector.
func (m *Resources) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), m.timeout)
	defer cancel()
	type key struct{ kind, node, phase string }
	counts := map[key]int{}
	failed := 0.0
	var vols v1alpha1.PloopVolumeList
	if err := m.r.List(ctx, &vols); err != nil {
		failed = 1
	}
	for _, v := range vols.Items {
		counts[key{"PloopVolume", v.Spec.NodeName, string(v.Status.Phase)}]++
	}
	var snaps v1alpha1.PloopSnapshotList
	if err := m.r.List(ctx, &snaps); err != nil {
		failed = 1
	}
	for _, s := range snaps.Items {
		counts[key{"PloopSnapshot", s.Spec.NodeName, string(s.Status.Phase)}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.GaugeValue, float64(n), k.kind, k.node, k.phase)
	}
	ch <- prometheus.MustNewConstMetric(m.errs, prometheus.GaugeValue, failed)
}

// Unregister removes the CSI metrics from reg.
func (m *CSI) Unregister(reg prometheus.Registerer) {
	reg.Unregister(m.calls)
	reg.Unregister(m.latency)
}

// Node counts what a node's volumes go through (attachments.Observer):
// I/O errors their images return, re-attaches after a restart, and how
// long online operations pause I/O.
type Node struct {
	ioErrors  *prometheus.CounterVec
	reattach  *prometheus.CounterVec
	pauses    *prometheus.HistogramVec
	collected []prometheus.Collector
}

// NewNode registers the node's event metrics with reg.
func NewNode(reg prometheus.Registerer) (*Node, error) {
	m := &Node{
		ioErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "nbd_io_errors_total",
			Help: "Requests of a volume's nbd device that its image failed (the kernel got an I/O error).",
		}, []string{"volume"}),
		reattach: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "nbd_reattaches_total",
			Help: "Volumes served again after a restart of the node plugin, by result (ok, failed).",
		}, []string{"result"}),
		pauses: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "online_pause_seconds",
			Help:    "How long online operations on attached volumes paused their I/O, by operation.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}, []string{"op"}),
	}
	m.collected = []prometheus.Collector{m.ioErrors, m.reattach, m.pauses}
	for _, c := range m.collected {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// IOError implements attachments.Observer.
func (m *Node) IOError(volumeID string) { m.ioErrors.WithLabelValues(volumeID).Inc() }

// Reattached implements attachments.Observer.
func (m *Node) Reattached(volumeID string, err error) {
	result := "ok"
	if err != nil {
		result = "failed"
	}
	m.reattach.WithLabelValues(result).Inc()
}

// Paused implements attachments.Observer.
func (m *Node) Paused(op string, d time.Duration) { m.pauses.WithLabelValues(op).Observe(d.Seconds()) }

// Unregister removes the node's event metrics from reg.
func (m *Node) Unregister(reg prometheus.Registerer) {
	for _, c := range m.collected {
		reg.Unregister(c)
	}
}
