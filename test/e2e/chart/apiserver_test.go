package chart

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"

	"github.com/ploop-csi/ploop-csi/test/e2e/gomod"
	"github.com/ploop-csi/ploop-csi/test/e2e/kubeapi"
)

// snapshotCRDModule holds the snapshot CRDs (config/crd in its module zip),
// at the release of the csi-snapshotter and snapshot-controller images.
const snapshotCRDModule = "github.com/kubernetes-csi/external-snapshotter/client/v8@v8.7.0"

// snapshotCRDs returns the directory of the VolumeSnapshot,
// VolumeSnapshotContent and VolumeSnapshotClass CRDs, from the Go module
// cache (fetched through the module proxy; the project does not depend on
// the module).
func snapshotCRDs(ctx context.Context, t *testing.T) string {
	t.Helper()
	dir, err := gomod.Dir(ctx, snapshotCRDModule)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "config", "crd")
}

// The ServiceMonitor CRD is generated, as the Prometheus Operator
// generates its own, from the Go types of its API module by controller-gen
// (the Makefile's version): the module carries the types, not the CRD.
const (
	monitoringModule  = "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring"
	monitoringVersion = "v0.95.2"
	controllerGen     = "sigs.k8s.io/controller-tools/cmd/controller-gen@v0.19.0"
)

// serviceMonitorCRD returns the path of the generated ServiceMonitor CRD.
func serviceMonitorCRD(ctx context.Context, t *testing.T) string {
	t.Helper()
	work := t.TempDir()
	files := map[string]string{
		"go.mod":  "module ploop-csi.invalid/servicemonitor-crd\n\ngo 1.24.0\n\nrequire " + monitoringModule + " " + monitoringVersion + "\n",
		"deps.go": "package deps\n\nimport _ \"" + monitoringModule + "/v1\"\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(work, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(work, "crds")
	for _, args := range [][]string{
		{"mod", "tidy"},
		{"run", controllerGen, "crd:maxDescLen=0", "paths=" + monitoringModule + "/v1", "output:crd:dir=" + out},
	} {
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = work
		cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, b)
		}
	}
	return filepath.Join(out, "monitoring.coreos.com_servicemonitors.yaml")
}

type apiCluster struct {
	srv    *kubeapi.Server
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

// startCluster runs a kube-apiserver with the project's and the snapshot
// CRDs and the test namespace.
func startCluster(t *testing.T) *apiCluster {
	t.Helper()
	srv := kubeapi.StartT(t, kubeapi.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := srv.InstallCRDs(ctx, crdDir+"/*.yaml"); err != nil {
		t.Fatal(err)
	}
	// The group snapshot CRDs in the same directory are not a prerequisite
	// of the chart: only the three the snapshotter and the classes use.
	if err := srv.InstallCRDs(ctx, snapshotCRDs(ctx, t)+"/snapshot.storage.k8s.io_*.yaml"); err != nil {
		t.Fatal(err)
	}
	if err := srv.InstallCRDs(ctx, serviceMonitorCRD(ctx, t)); err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(srv.Config())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(srv.Config())
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(srv.Config())
	if err != nil {
		t.Fatal(err)
	}
	return &apiCluster{srv: srv, dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))}
}

// dryRun sends obj to the server as a create with server-side dry run and
// strict field validation: every admission and validation step runs, an
// unknown or duplicated field is an error, and nothing is stored.
func (c *apiCluster) dryRun(ctx context.Context, obj *unstructured.Unstructured) error {
	gvk := obj.GroupVersionKind()
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return fmt.Errorf("%s %s: %w", gvk, obj.GetName(), err)
	}
	var ri dynamic.ResourceInterface = c.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		if obj.GetNamespace() == "" {
			return fmt.Errorf("%s %s is namespaced but names no namespace", gvk.Kind, obj.GetName())
		}
		ri = c.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
	} else if obj.GetNamespace() != "" {
		return fmt.Errorf("%s %s is cluster-scoped but names namespace %s", gvk.Kind, obj.GetName(), obj.GetNamespace())
	}
	_, err = ri.Create(ctx, obj, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: metav1.FieldValidationStrict})
	if err != nil {
		return fmt.Errorf("%s %s: %w", gvk.Kind, obj.GetName(), err)
	}
	return nil
}

// TestServerDryRun: a real kube-apiserver accepts every object of every
// combination, and of deploy/.
func TestServerDryRun(t *testing.T) {
	c := startCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	check := func(t *testing.T, objs []*unstructured.Unstructured) {
		if len(objs) == 0 {
			t.Fatal("no objects")
		}
		for _, o := range objs {
			if err := c.dryRun(ctx, o); err != nil {
				t.Error(err)
			}
		}
	}
	for _, cb := range combos {
		t.Run(cb.name, func(t *testing.T) { check(t, render(t, helmbin3, cb)) })
	}
	// deploy/ is rendered for kube-system, which every API server has. Its
	// CRDs are the chart's crds/ (make check-deploy keeps them equal), and
	// installed already.
	t.Run("deploy", func(t *testing.T) {
		b, err := os.ReadFile(deployFile)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := parseObjects(string(b))
		if err != nil {
			t.Fatal(err)
		}
		var rest []*unstructured.Unstructured
		crds := 0
		for _, o := range objs {
			if o.GetKind() == "CustomResourceDefinition" {
				crds++
				continue
			}
			if ns := o.GetNamespace(); ns != "" && ns != "kube-system" {
				t.Errorf("deploy/: %s %s in namespace %s, want kube-system", o.GetKind(), o.GetName(), ns)
			}
			rest = append(rest, o)
		}
		if crds != 2 {
			t.Errorf("deploy/ has %d CRDs, want PloopVolume's and PloopSnapshot's", crds)
		}
		check(t, rest)
	})
	// A dry run that would pass anything proves nothing: an object with a
	// wrong field must be refused.
	t.Run("refuses", func(t *testing.T) {
		for _, tc := range []struct {
			name, combo, kind, obj string
			mutate                 func(*unstructured.Unstructured)
		}{
			{"unknown field", "default", "CSIDriver", "csi.ploop.io", func(u *unstructured.Unstructured) {
				_ = unstructured.SetNestedField(u.Object, true, "spec", "attachRequiredd")
			}},
			{"bad value", "default", "CSIDriver", "csi.ploop.io", func(u *unstructured.Unstructured) {
				_ = unstructured.SetNestedField(u.Object, "Sometimes", "spec", "fsGroupPolicy")
			}},
			{"ServiceMonitor field", "metrics", "ServiceMonitor", "ploop-csi", func(u *unstructured.Unstructured) {
				_ = unstructured.SetNestedField(u.Object, "30s", "spec", "scrapeEvery")
			}},
		} {
			i := slices.IndexFunc(combos, func(c combo) bool { return c.name == tc.combo })
			obj := find(render(t, helmbin3, combos[i]), tc.kind, tc.obj).DeepCopy()
			tc.mutate(obj)
			err := c.dryRun(ctx, obj)
			if err == nil || !(apierrors.IsInvalid(err) || apierrors.IsBadRequest(err)) {
				t.Errorf("%s: the server answered %v, want a validation error", tc.name, err)
			}
		}
	})
}

// TestHelmInstall installs and uninstalls the chart for real with each
// Helm, as the README says, against the API server: Helm's own checks
// (ownership, the CRDs in crds/, NOTES.txt) run too. No controllers or
// kubelets run there, so nothing starts; the objects are only stored.
func TestHelmInstall(t *testing.T) {
	c := startCluster(t)
	kubeconfig := writeKubeconfig(t, c.srv)
	for _, v := range helms {
		t.Run(v, func(t *testing.T) {
			args := []string{"--kubeconfig", kubeconfig, "--namespace", namespace}
			out, err := helm(t, v, append([]string{"install", release, chartDir}, args...)...)
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"STATUS: deployed", "kubectl get ploopvolumes", "kubectl get csidriver csi.ploop.io"} {
				if !strings.Contains(out, want) {
					t.Errorf("helm install output lacks %q:\n%s", want, out)
				}
			}
			dyn := c.dyn
			ctx := context.Background()
			if _, err := dyn.Resource(csiDriverGVR).Get(ctx, "csi.ploop.io", metav1.GetOptions{}); err != nil {
				t.Errorf("after helm install: %v", err)
			}
			if _, err := helm(t, v, append([]string{"uninstall", release}, args...)...); err != nil {
				t.Fatal(err)
			}
			// The next Helm installs the same cluster-scoped objects: the
			// uninstall must have removed them.
			if _, err := dyn.Resource(csiDriverGVR).Get(ctx, "csi.ploop.io", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				t.Errorf("after helm uninstall, the CSIDriver: %v", err)
			}
		})
	}
}

var csiDriverGVR = schema.GroupVersionResource{Group: "storage.k8s.io", Version: "v1", Resource: "csidrivers"}

// writeKubeconfig writes the admin's credentials for helm.
func writeKubeconfig(t *testing.T, srv *kubeapi.Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := srv.WriteKubeconfig(path); err != nil {
		t.Fatal(err)
	}
	return path
}
