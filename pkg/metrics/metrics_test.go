package metrics

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc/codes"

	"github.com/ploop-csi/ploop-csi/pkg/attachments"
	"github.com/ploop-csi/ploop-csi/pkg/catalog"
)

func TestCSI(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m, err := NewCSI(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ObserveCall("CreateVolume", codes.OK, 30*time.Millisecond)
	m.ObserveCall("CreateVolume", codes.OK, 2*time.Second)
	m.ObserveCall("CreateVolume", codes.ResourceExhausted, time.Millisecond)
	for _, tt := range []struct {
		code string
		want float64
	}{{"OK", 2}, {"ResourceExhausted", 1}, {"Internal", 0}} {
		if got := testutil.ToFloat64(m.calls.WithLabelValues("CreateVolume", tt.code)); got != tt.want {
			t.Errorf("operations_total{CreateVolume,%s} = %v, want %v", tt.code, got, tt.want)
		}
	}
	if n := testutil.CollectAndCount(m.latency); n != 2 {
		t.Errorf("latency series: %d, want 2", n)
	}
	if _, err := NewCSI(reg); err == nil {
		t.Error("registering twice succeeded")
	}
	m.Unregister(reg)
	if _, err := NewCSI(reg); err != nil {
		t.Errorf("after Unregister: %v", err)
	}
}

// TestStorage scrapes a real catalogue: counts, per-volume promised and
// occupied bytes, and the root's figures match what was created.
func TestStorage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cat, err := catalog.Open(t.TempDir(), catalog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	a, err := cat.CreateVolume(ctx, catalog.VolumeRequest{Name: "a", RequiredBytes: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cat.CreateVolume(ctx, catalog.VolumeRequest{Name: "b", RequiredBytes: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := cat.CreateSnapshot(ctx, "s", a.ID); err != nil {
		t.Fatal(err)
	}
	s := NewStorage("node-1", cat, time.Minute)
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(s); err != nil {
		t.Fatal(err)
	}
	want := `
# HELP ploop_csi_root_provisioned_bytes The sizes promised to all volumes of the root.
# TYPE ploop_csi_root_provisioned_bytes gauge
ploop_csi_root_provisioned_bytes{node="node-1"} 2.5165824e+07
# HELP ploop_csi_snapshots Snapshots on the node's storage root, by type.
# TYPE ploop_csi_snapshots gauge
ploop_csi_snapshots{node="node-1",type="ploop"} 1
ploop_csi_snapshots{node="node-1",type="simfs"} 0
# HELP ploop_csi_storage_scrape_errors 1 when the last scrape could not read the catalogue (its log says why).
# TYPE ploop_csi_storage_scrape_errors gauge
ploop_csi_storage_scrape_errors{node="node-1"} 0
# HELP ploop_csi_volume_provisioned_bytes The size promised to a volume.
# TYPE ploop_csi_volume_provisioned_bytes gauge
ploop_csi_volume_provisioned_bytes{node="node-1",type="ploop",volume="` + a.ID + `"} 8.388608e+06
# HELP ploop_csi_volumes Volumes on the node's storage root, by type.
# TYPE ploop_csi_volumes gauge
ploop_csi_volumes{node="node-1",type="ploop"} 2
ploop_csi_volumes{node="node-1",type="simfs"} 0
`
	// One volume's series is enough to compare exactly; the other's value
	// is checked through the root's sum.
	got, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range got {
		if mf.GetName() == "ploop_csi_volume_provisioned_bytes" {
			var keep = mf.Metric[:0]
			for _, m := range mf.Metric {
				for _, l := range m.Label {
					if l.GetName() == "volume" && l.GetValue() == a.ID {
						keep = append(keep, m)
					}
				}
			}
			mf.Metric = keep
		}
	}
	if err := testutil.GatherAndCompare(prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return got, nil }), strings.NewReader(want),
		"ploop_csi_root_provisioned_bytes", "ploop_csi_snapshots", "ploop_csi_storage_scrape_errors", "ploop_csi_volume_provisioned_bytes", "ploop_csi_volumes"); err != nil {
		t.Error(err)
	}
	for _, name := range []string{"ploop_csi_volume_allocated_bytes", "ploop_csi_root_allocated_bytes", "ploop_csi_root_free_bytes", "ploop_csi_root_available_bytes"} {
		found := false
		for _, mf := range got {
			found = found || mf.GetName() == name && len(mf.Metric) > 0
		}
		if !found {
			t.Errorf("%s missing", name)
		}
	}
}

func TestNode(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m, err := NewNode(reg)
	if err != nil {
		t.Fatal(err)
	}
	var _ attachments.Observer = m
	m.IOError("ploop-a")
	m.IOError("ploop-a")
	m.Reattached("ploop-a", nil)
	m.Reattached("ploop-b", errors.New("gone"))
	m.Paused("snapshot", 3*time.Millisecond)
	for _, tt := range []struct {
		c    prometheus.Collector
		want float64
	}{
		{m.ioErrors.WithLabelValues("ploop-a"), 2},
		{m.reattach.WithLabelValues("ok"), 1},
		{m.reattach.WithLabelValues("failed"), 1},
	} {
		if got := testutil.ToFloat64(tt.c); got != tt.want {
			t.Errorf("%v = %v, want %v", tt.c, got, tt.want)
		}
	}
	if n := testutil.CollectAndCount(m.pauses); n != 1 {
		t.Errorf("pause series %d, want 1", n)
	}
	m.Unregister(reg)
	if _, err := NewNode(reg); err != nil {
		t.Errorf("after Unregister: %v", err)
	}
}
