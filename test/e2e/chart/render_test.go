package chart

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/ploop-csi/ploop-csi/test/e2e/helmbin"
)

const (
	chartDir   = "../../../charts/ploop-csi"
	crdDir     = chartDir + "/crds"
	deployFile = "../../../deploy/ploop-csi.yaml"
	release    = "ploop-csi"
	// The namespace the tests install into; the chart must not assume
	// kube-system.
	namespace = "ploop-csi-test"
)

// combo is one documented combination of values.
type combo struct {
	name string
	set  []string // --set arguments
}

// combos are the combinations the README and values.yaml document; every
// test that renders the chart runs each.
var combos = []combo{
	{name: "default"},
	{name: "shared", set: []string{"storage.mode=shared", "storage.hostPath=/mnt/ploop"}},
	{name: "metrics", set: []string{"metrics.enabled=true", "metrics.serviceMonitor.enabled=true"}},
	{name: "k0s", set: []string{"kubeletDir=/var/lib/k0s/kubelet"}},
	{name: "snapshot-controller", set: []string{"snapshotController.install=true"}},
	{name: "ublk", set: []string{"node.attach=ublk"}},
	{name: "classes", set: []string{"storageClasses.ploopExt4.default=true", "storageClasses.ploopXfs.enabled=false",
		"storageClasses.simfs.enabled=false", "volumeSnapshotClass.enabled=false"}},
	// The end-to-end cluster's: no registrar or livenessprobe image, pods
	// on the node's network, the API server through the VM's forward.
	{name: "e2e", set: []string{"node.registration=builtin", "livenessProbeSidecar=false", "hostNetwork=true",
		"kubernetesAPI.host=192.0.2.100", "kubernetesAPI.port=6443", "controller.healthPort=9811", "controller.replicas=1"}},
}

var helms = []string{helmbin.V3, helmbin.V4}

// helm runs helm of version with args and returns its standard output, or
// an error with its standard error.
func helm(t *testing.T, version string, args ...string) (string, error) {
	t.Helper()
	// The build (minutes on a cold cache) must not eat the command's time.
	bin := helmPath(t, version)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	// helm keeps its own state out of the home directory and the repo.
	home := t.TempDir()
	cmd.Env = append(cmd.Environ(), "HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"), "HELM_DATA_HOME="+filepath.Join(home, "data"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s %s: %w\n%s", version, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

var (
	helmMu    sync.Mutex
	helmPaths = map[string]string{}
)

// helmPath builds helm on first use (minutes on a cold cache, then cached).
func helmPath(t *testing.T, version string) string {
	t.Helper()
	helmMu.Lock()
	defer helmMu.Unlock()
	if p, ok := helmPaths[version]; ok {
		return p
	}
	ctx := context.Background()
	if dl, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-15*time.Second))
		defer cancel()
	}
	p, err := helmbin.Path(ctx, version, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	helmPaths[version] = p
	return p
}

func templateArgs(c combo, extra ...string) []string {
	args := []string{"template", release, chartDir, "--namespace", namespace}
	for _, s := range c.set {
		args = append(args, "--set", s)
	}
	return append(args, extra...)
}

var (
	renderMu sync.Mutex
	renders  = map[string][]*unstructured.Unstructured{}
)

// render is the chart's objects for c, rendered by helm version; each
// combination is rendered once per test binary.
func render(t *testing.T, version string, c combo) []*unstructured.Unstructured {
	t.Helper()
	key := version + "/" + c.name
	renderMu.Lock()
	defer renderMu.Unlock()
	if objs, ok := renders[key]; ok {
		return objs
	}
	out, err := helm(t, version, templateArgs(c)...)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := parseObjects(out)
	if err != nil {
		t.Fatalf("helm %s template (%s): %v", version, c.name, err)
	}
	renders[key] = objs
	return objs
}

// parseObjects splits a multi-document YAML stream into objects, skipping
// empty documents.
func parseObjects(s string) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(s), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return objs, nil
			}
			return nil, err
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if u.GetKind() == "" || u.GetAPIVersion() == "" || u.GetName() == "" {
			return nil, fmt.Errorf("an object without kind, apiVersion or name: %v", m)
		}
		objs = append(objs, u)
	}
}

// find returns the one object of kind and name, or nil.
func find(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	return nil
}

func ofKind(objs []*unstructured.Unstructured, kind string) []*unstructured.Unstructured {
	var r []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind {
			r = append(r, o)
		}
	}
	return r
}

// as converts u into a typed object, failing t on a field the type lacks.
func as[T any](t *testing.T, u *unstructured.Unstructured) *T {
	t.Helper()
	if u == nil {
		t.Fatalf("no %T rendered", *new(T))
	}
	var v T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, &v, true); err != nil {
		t.Fatalf("%s %s: %v", u.GetKind(), u.GetName(), err)
	}
	return &v
}
