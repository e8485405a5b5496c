package v1alpha1_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	v1alpha1 "github.com/ploop-csi/ploop-csi/pkg/api/v1alpha1"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

// TestCRDsOnAPIServer installs the chart's CRDs into a real kube-apiserver
// and uses them as the controller and the node will: typed objects through
// controller-runtime, status written through the status subresource only,
// and the server's own validation of what the kubebuilder markers promise.
func TestCRDsOnAPIServer(t *testing.T) {
	srv := kubeapi.StartT(t, kubeapi.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{apiextensionsv1.AddToScheme, v1alpha1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	installCRDs(ctx, t, srv.Config(), scheme)
	c, err := client.New(srv.Config(), client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("PrinterColumns", func(t *testing.T) { testPrinterColumns(ctx, t, c) })
	t.Run("PloopVolume", func(t *testing.T) { testVolume(ctx, t, c, srv.Config()) })
	t.Run("PloopSnapshot", func(t *testing.T) { testSnapshot(ctx, t, c) })
	t.Run("Rejected", func(t *testing.T) { testRejected(ctx, t, c) })
}

// installCRDs creates every CRD of the chart and waits until the server
// serves each kind: Established first, then discovery, from which the
// client's REST mapper learns the kinds. The first creates of a kind will
// still take up to 2 s: the server holds a create that comes within 2 s of
// its CRD becoming Established, for HA servers that have not seen it yet
// (apiextensions-apiserver's customresource_handler.go).
func installCRDs(ctx context.Context, t *testing.T, cfg *rest.Config, scheme *runtime.Scheme) {
	t.Helper()
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob(filepath.Join("..", "..", "..", "charts", "ploop-csi", "crds", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no CRDs in charts/ploop-csi/crds (%v)", err)
	}
	var names, kinds []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := yaml.UnmarshalStrict(b, &crd); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if err := c.Create(ctx, &crd); err != nil {
			t.Fatalf("create CRD from %s: %v", f, err)
		}
		names = append(names, crd.Name)
		kinds = append(kinds, crd.Spec.Names.Kind)
	}

	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	poll(ctx, t, "the CRDs established and their kinds discoverable", func() bool {
		for _, name := range names {
			var crd apiextensionsv1.CustomResourceDefinition
			if err := c.Get(ctx, client.ObjectKey{Name: name}, &crd); err != nil || !established(&crd) {
				return false
			}
		}
		list, err := dc.ServerResourcesForGroupVersion(v1alpha1.GroupVersion.String())
		if err != nil {
			return false
		}
		for _, k := range kinds {
			if !slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Kind == k }) {
				return false
			}
		}
		return true
	})
}

func established(crd *apiextensionsv1.CustomResourceDefinition) bool {
	for _, c := range crd.Status.Conditions {
		if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
			return true
		}
	}
	return false
}

// poll checks cond every 50 ms until it holds, failing t when ctx ends.
func poll(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

// testPrinterColumns reads the CRDs back from the server, which drops what
// it does not understand, so a column controller-gen wrote but the server
// ignored would show here.
func testPrinterColumns(ctx context.Context, t *testing.T, c client.Client) {
	for _, tc := range []struct {
		crd     string
		columns []string
	}{
		{"ploopvolumes.ploop.io", []string{"Node", "Type", "Size", "Allocated", "Phase", "Age"}},
		{"ploopsnapshots.ploop.io", []string{"Node", "Source", "ReadyToUse", "Size", "Phase", "Age"}},
	} {
		var crd apiextensionsv1.CustomResourceDefinition
		if err := c.Get(ctx, client.ObjectKey{Name: tc.crd}, &crd); err != nil {
			t.Fatal(err)
		}
		if len(crd.Spec.Versions) != 1 || crd.Spec.Versions[0].Name != v1alpha1.GroupVersion.Version {
			t.Fatalf("%s: versions %+v", tc.crd, crd.Spec.Versions)
		}
		var got []string
		for _, col := range crd.Spec.Versions[0].AdditionalPrinterColumns {
			got = append(got, col.Name)
		}
		if !slices.Equal(got, tc.columns) {
			t.Errorf("%s: printer columns %v, want %v", tc.crd, got, tc.columns)
		}
	}
}

func testVolume(ctx context.Context, t *testing.T, c client.Client, cfg *rest.Config) {
	vol := &v1alpha1.PloopVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "pvc-0001", Finalizers: []string{"ploop.io/node"}},
		Spec: v1alpha1.PloopVolumeSpec{
			Name: "pvc-0001", NodeName: "node-a", Type: "ploop", Size: resource.MustParse("10Gi"),
			FSType: "xfs", ClusterSize: 1 << 20,
			Source: &v1alpha1.VolumeSource{Snapshot: "snap-id"},
		},
	}
	if err := c.Create(ctx, vol); err != nil {
		t.Fatal(err)
	}

	// The node writes status alone; the controller's spec stays.
	size, used := resource.MustParse("10Gi"), resource.MustParse("64Mi")
	vol.Status = v1alpha1.PloopVolumeStatus{
		Phase: v1alpha1.Ready, VolumeID: "vol-id", Size: &size, Allocated: &used,
		AttachedNode: "node-a", ObservedGeneration: vol.Generation,
	}
	vol.Spec.NodeName = "ignored-by-status-update"
	if err := c.Status().Update(ctx, vol); err != nil {
		t.Fatalf("status update: %v", err)
	}
	var got v1alpha1.PloopVolume
	if err := c.Get(ctx, client.ObjectKeyFromObject(vol), &got); err != nil {
		t.Fatal(err)
	}
	if got.Spec.NodeName != "node-a" {
		t.Errorf("a status update changed spec.nodeName to %q", got.Spec.NodeName)
	}
	st := got.Status
	if st.Phase != v1alpha1.Ready || st.VolumeID != "vol-id" || st.Size == nil || st.Size.Cmp(size) != 0 ||
		st.Allocated == nil || st.Allocated.Cmp(used) != 0 || st.AttachedNode != "node-a" || st.ObservedGeneration != 1 {
		t.Errorf("status read back %+v", st)
	}
	if got.Spec.Size.Cmp(resource.MustParse("10Gi")) != 0 || got.Spec.Source == nil || got.Spec.Source.Snapshot != "snap-id" ||
		got.Spec.ClusterSize != 1<<20 || !slices.Equal(got.Finalizers, []string{"ploop.io/node"}) {
		t.Errorf("spec read back %+v, finalizers %v", got.Spec, got.Finalizers)
	}

	// And the controller's spec update leaves status alone while the
	// generation tells the node there is new work.
	got.Spec.Size = resource.MustParse("20Gi")
	got.Status.Phase = v1alpha1.Failed
	if err := c.Update(ctx, &got); err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, client.ObjectKeyFromObject(vol), &got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != v1alpha1.Ready || got.Generation != 2 || got.Spec.Size.Cmp(resource.MustParse("20Gi")) != 0 {
		t.Errorf("after a spec update: phase %q, generation %d, size %s", got.Status.Phase, got.Generation, got.Spec.Size.String())
	}

	// What `kubectl get ploopvolumes` shows: the server renders the
	// printer columns as a Table.
	table := getTable(ctx, t, cfg, "/apis/ploop.io/v1alpha1/ploopvolumes/"+vol.Name)
	want := map[string]string{"Node": "node-a", "Type": "ploop", "Size": "10Gi", "Allocated": "64Mi", "Phase": "Ready"}
	if len(table.Rows) != 1 || len(table.Rows[0].Cells) != len(table.ColumnDefinitions) {
		t.Fatalf("table %+v", table)
	}
	for i, col := range table.ColumnDefinitions {
		if w, ok := want[col.Name]; ok && table.Rows[0].Cells[i] != w {
			t.Errorf("column %s shows %v, want %s", col.Name, table.Rows[0].Cells[i], w)
		}
		delete(want, col.Name)
	}
	if len(want) != 0 {
		t.Errorf("table lacks columns %v", want)
	}
}

// getTable asks for path as kubectl get does.
func getTable(ctx context.Context, t *testing.T, cfg *rest.Config, path string) metav1.Table {
	t.Helper()
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, cfg.Host+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s as Table: %s: %s (%v)", path, resp.Status, body, err)
	}
	var table metav1.Table
	if err := json.Unmarshal(body, &table); err != nil {
		t.Fatal(err)
	}
	return table
}

func testSnapshot(ctx context.Context, t *testing.T, c client.Client) {
	snap := &v1alpha1.PloopSnapshot{
		ObjectMeta: metav1.ObjectMeta{Name: "snapshot-0001"},
		Spec:       v1alpha1.PloopSnapshotSpec{Name: "snapshot-0001", NodeName: "node-a", SourceVolume: "vol-id"},
	}
	if err := c.Create(ctx, snap); err != nil {
		t.Fatal(err)
	}
	size := resource.MustParse("10Gi")
	cut := metav1.NewTime(time.Now().Truncate(time.Second))
	snap.Status = v1alpha1.PloopSnapshotStatus{
		Phase: v1alpha1.Ready, SnapshotID: "snap-id", ReadyToUse: true, Size: &size,
		CreationTime: &cut, ObservedGeneration: snap.Generation,
	}
	if err := c.Status().Update(ctx, snap); err != nil {
		t.Fatalf("status update: %v", err)
	}
	var got v1alpha1.PloopSnapshot
	if err := c.Get(ctx, client.ObjectKeyFromObject(snap), &got); err != nil {
		t.Fatal(err)
	}
	st := got.Status
	if st.Phase != v1alpha1.Ready || st.SnapshotID != "snap-id" || !st.ReadyToUse || st.Size == nil ||
		st.Size.Cmp(size) != 0 || st.CreationTime == nil || !st.CreationTime.Equal(&cut) || st.ObservedGeneration != 1 {
		t.Errorf("status read back %+v", st)
	}
	if got.Spec != snap.Spec {
		t.Errorf("spec read back %+v, want %+v", got.Spec, snap.Spec)
	}

	// A failure as the node reports it, then its clearing by a success.
	got.Status.Phase, got.Status.ReadyToUse = v1alpha1.Failed, false
	got.Status.Error = &v1alpha1.OperationError{Code: "ResourceExhausted", Message: "storage root full"}
	if err := c.Status().Update(ctx, &got); err != nil {
		t.Fatal(err)
	}
	got.Status.Phase, got.Status.ReadyToUse, got.Status.Error = v1alpha1.Ready, true, nil
	if err := c.Status().Update(ctx, &got); err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, client.ObjectKeyFromObject(snap), &got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Error != nil || got.Status.Phase != v1alpha1.Ready {
		t.Errorf("after clearing the error: %+v", got.Status)
	}
}

// testRejected checks that the server, not only our code, refuses what the
// types' validation markers forbid, naming the field.
func testRejected(ctx context.Context, t *testing.T, c client.Client) {
	volume := func(name string, edit func(*v1alpha1.PloopVolume)) *v1alpha1.PloopVolume {
		v := &v1alpha1.PloopVolume{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       v1alpha1.PloopVolumeSpec{Name: name, Type: "ploop", Size: resource.MustParse("1Gi")},
		}
		edit(v)
		return v
	}
	snapshot := func(name string, edit func(*v1alpha1.PloopSnapshot)) *v1alpha1.PloopSnapshot {
		s := &v1alpha1.PloopSnapshot{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       v1alpha1.PloopSnapshotSpec{Name: name, SourceVolume: "vol-id"},
		}
		edit(s)
		return s
	}
	unstructuredVolume := func(name string, spec map[string]any) *unstructured.Unstructured {
		u := &unstructured.Unstructured{Object: map[string]any{"spec": spec}}
		u.SetAPIVersion(v1alpha1.GroupVersion.String())
		u.SetKind("PloopVolume")
		u.SetName(name)
		return u
	}

	for _, tc := range []struct {
		name  string
		obj   client.Object
		field string // the field the server's message must name
	}{
		{"VolumeType", volume("bad-type", func(v *v1alpha1.PloopVolume) { v.Spec.Type = "zfs" }), "spec.type"},
		{"VolumeFSType", volume("bad-fstype", func(v *v1alpha1.PloopVolume) { v.Spec.FSType = "btrfs" }), "spec.fsType"},
		{"VolumeEmptyName", volume("empty-name", func(v *v1alpha1.PloopVolume) { v.Spec.Name = "" }), "spec.name"},
		{"VolumeNoType", unstructuredVolume("no-type", map[string]any{"name": "x", "size": "1Gi"}), "spec.type"},
		{"VolumeNoSize", unstructuredVolume("no-size", map[string]any{"name": "x", "type": "ploop"}), "spec.size"},
		{"VolumeSizeNotQuantity", unstructuredVolume("bad-size", map[string]any{"name": "x", "type": "ploop", "size": "lots"}), "spec.size"},
		{"SnapshotEmptyName", snapshot("snap-empty-name", func(s *v1alpha1.PloopSnapshot) { s.Spec.Name = "" }), "spec.name"},
		{"SnapshotEmptySource", snapshot("snap-empty-source", func(s *v1alpha1.PloopSnapshot) { s.Spec.SourceVolume = "" }), "spec.sourceVolume"},
	} {
		t.Run("Create"+tc.name, func(t *testing.T) {
			err := c.Create(ctx, tc.obj)
			checkInvalid(t, err, tc.field)
		})
	}

	// Status is validated on its own path: an unknown phase from a node.
	v := volume("status-phase", func(*v1alpha1.PloopVolume) {})
	s := snapshot("snap-status-phase", func(*v1alpha1.PloopSnapshot) {})
	for _, tc := range []struct {
		name string
		obj  client.Object
		set  func()
	}{
		{"VolumePhase", v, func() { v.Status.Phase = "Done" }},
		{"SnapshotPhase", s, func() { s.Status.Phase = "Done" }},
	} {
		t.Run("Status"+tc.name, func(t *testing.T) {
			if err := c.Create(ctx, tc.obj); err != nil {
				t.Fatal(err)
			}
			tc.set()
			checkInvalid(t, c.Status().Update(ctx, tc.obj), "status.phase")
		})
	}
}

func checkInvalid(t *testing.T, err error, field string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted; want rejected for %s", field)
	}
	if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), field) {
		t.Fatalf("error %v; want Invalid naming %s", err, field)
	}
}
