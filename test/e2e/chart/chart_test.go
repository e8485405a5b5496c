package chart

import (
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func TestLint(t *testing.T) {
	for _, v := range helms {
		for _, c := range combos {
			t.Run(v+"/"+c.name, func(t *testing.T) {
				args := []string{"lint", "--strict", chartDir, "--namespace", namespace}
				for _, s := range c.set {
					args = append(args, "--set", s)
				}
				if out, err := helm(t, v, args...); err != nil {
					t.Fatalf("%v\n%s", err, out)
				}
			})
		}
	}
}

// TestHelmVersionsAgree: Helm 3 and Helm 4 render the same objects, so
// what is proved of one holds for the other.
func TestHelmVersionsAgree(t *testing.T) {
	for _, c := range combos {
		t.Run(c.name, func(t *testing.T) {
			a, b := render(t, helmbin3, c), render(t, helmbin4, c)
			if len(a) != len(b) {
				t.Fatalf("helm %s renders %d objects, helm %s %d", helmbin3, len(a), helmbin4, len(b))
			}
			for i := range a {
				if !reflect.DeepEqual(a[i].Object, b[i].Object) {
					t.Errorf("object %d (%s %s) differs between helm %s and %s", i, a[i].GetKind(), a[i].GetName(), helmbin3, helmbin4)
				}
			}
		})
	}
}

var helmbin3, helmbin4 = helms[0], helms[1]

// TestRendered checks each combination's objects for what the chart
// promises in it.
func TestRendered(t *testing.T) {
	for _, c := range combos {
		t.Run(c.name, func(t *testing.T) {
			objs := render(t, helmbin3, c)
			r := rendered{t: t, objs: objs, combo: c.name}
			r.common()
			switch c.name {
			case "default":
				r.wantArgs(container(t, r.controller().Spec.Template.Spec, "ploop-csi"), "--health-address=:9810")
				r.localMode()
				r.noMetrics()
				r.classes(true, true, true, true, false)
				if d := find(objs, "Deployment", "ploop-csi-snapshot-controller"); d != nil {
					t.Error("the snapshot controller is rendered though snapshotController.install is false")
				}
			case "shared":
				r.sharedMode("/mnt/ploop")
			case "metrics":
				r.metrics()
			case "k0s":
				r.kubeletDir("/var/lib/k0s/kubelet")
			case "snapshot-controller":
				r.snapshotController()
			case "ublk":
				r.ublkLoaded()
			case "classes":
				r.classes(true, false, false, false, true)
			case "e2e":
				r.e2e()
			default:
				t.Fatalf("combination %s has no checks", c.name)
			}
		})
	}
}

type rendered struct {
	t     *testing.T
	objs  []*unstructured.Unstructured
	combo string
}

// attach is the node's transport in the combination.
func (r rendered) attach() string {
	if r.combo == "ublk" {
		return "ublk"
	}
	return "nbd"
}

// ublkLoaded: with ublk the node's init container loads ublk_drv too
// (before nbd, which stays required for volumes that ask for it).
func (r rendered) ublkLoaded() {
	load := container(r.t, r.node().Spec.Template.Spec, "load-nbd")
	script := strings.Join(load.Command, " ")
	if !strings.Contains(script, "modprobe ublk_drv") || !strings.Contains(script, "modprobe nbd") {
		r.t.Errorf("the init container does not load ublk_drv and nbd: %q", script)
	}
}

// sidecars reports whether the combination runs the registrar and the
// liveness-probe sidecars.
func (r rendered) sidecars() bool { return r.combo != "e2e" }

func (r rendered) controller() *appsv1.Deployment {
	return as[appsv1.Deployment](r.t, find(r.objs, "Deployment", "ploop-csi-controller"))
}

func (r rendered) node() *appsv1.DaemonSet {
	return as[appsv1.DaemonSet](r.t, find(r.objs, "DaemonSet", "ploop-csi-node"))
}

func container(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s", name)
	return corev1.Container{}
}

func volume(t *testing.T, spec corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %s", name)
	return corev1.Volume{}
}

func mount(t *testing.T, c corev1.Container, name string) corev1.VolumeMount {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == name {
			return m
		}
	}
	t.Fatalf("container %s does not mount %s", c.Name, name)
	return corev1.VolumeMount{}
}

func hasArg(c corev1.Container, arg string) bool { return slices.Contains(c.Args, arg) }

func (r rendered) wantArgs(c corev1.Container, want ...string) {
	r.t.Helper()
	for _, a := range want {
		if !hasArg(c, a) {
			r.t.Errorf("container %s lacks %s; args: %q", c.Name, a, c.Args)
		}
	}
}

func (r rendered) noArgs(c corev1.Container, unwanted ...string) {
	r.t.Helper()
	for _, a := range c.Args {
		for _, u := range unwanted {
			if a == u || strings.HasPrefix(a, u+"=") {
				r.t.Errorf("container %s has %s; args: %q", c.Name, a, c.Args)
			}
		}
	}
}

// common: what holds in every combination.
func (r rendered) common() {
	t := r.t
	d := as[storagev1.CSIDriver](t, find(r.objs, "CSIDriver", "csi.ploop.io"))
	if *d.Spec.AttachRequired || !*d.Spec.PodInfoOnMount || *d.Spec.FSGroupPolicy != storagev1.FileFSGroupPolicy ||
		*d.Spec.RequiresRepublish || !reflect.DeepEqual(d.Spec.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent}) {
		t.Errorf("CSIDriver spec %+v", d.Spec)
	}

	ctrl := r.controller()
	want := int32(2)
	if r.combo == "e2e" {
		want = 1
	}
	if *ctrl.Spec.Replicas != want && ctrl.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("controller replicas %d, want %d", *ctrl.Spec.Replicas, want) // shared mode checks its own
	}
	spec := ctrl.Spec.Template.Spec
	var names []string
	for _, c := range spec.Containers {
		names = append(names, c.Name)
	}
	wantNames := []string{"ploop-csi", "csi-provisioner", "csi-snapshotter", "csi-resizer", "liveness-probe"}
	if !r.sidecars() {
		wantNames = wantNames[:4]
	}
	if !reflect.DeepEqual(names, wantNames) {
		t.Errorf("controller containers %q, want %q", names, wantNames)
	}
	drv := container(t, spec, "ploop-csi")
	r.wantArgs(drv, "--mode=controller", "--nodeid=$(NODE_NAME)", "--endpoint=unix:///csi/csi.sock", "--drivername=csi.ploop.io",
		"--v=2", "--leader-elect=true", "--leader-election-namespace=$(NAMESPACE)")
	prov := container(t, spec, "csi-provisioner")
	r.wantArgs(prov, "--csi-address=/csi/csi.sock", "--feature-gates=Topology=true", "--extra-create-metadata",
		"--leader-election", "--leader-election-namespace=$(NAMESPACE)", "--default-fstype=ext4", "--timeout=60s")
	env := map[string]string{}
	for _, e := range prov.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	if env["POD_NAME"] != "metadata.name" || env["NAMESPACE"] != "metadata.namespace" {
		t.Errorf("the provisioner's POD_NAME and NAMESPACE (for its capacity objects' owner) are %v", env)
	}
	r.wantArgs(container(t, spec, "csi-snapshotter"), "--csi-address=/csi/csi.sock", "--leader-election", "--extra-create-metadata")
	r.wantArgs(container(t, spec, "csi-resizer"), "--csi-address=/csi/csi.sock", "--leader-election", "--handle-volume-inuse-error=false")
	if r.sidecars() {
		r.wantArgs(container(t, spec, "liveness-probe"), "--csi-address=/csi/csi.sock")
	}

	node := r.node()
	ns := node.Spec.Template.Spec
	if ns.HostPID {
		t.Error("the node plugin shares the host's PID namespace")
	}
	nd := container(t, ns, "ploop-csi")
	// The image's user is unprivileged: the node's containers must be
	// root as well as privileged, or they keep no capability.
	for _, c := range []corev1.Container{nd, container(t, ns, "load-nbd")} {
		sc := c.SecurityContext
		if sc == nil || sc.Privileged == nil || !*sc.Privileged || sc.RunAsUser == nil || *sc.RunAsUser != 0 {
			t.Errorf("node container %s is not privileged root: %+v", c.Name, sc)
		}
	}
	r.wantArgs(nd, "--mode=node", "--nodeid=$(NODE_NAME)", "--endpoint=unix:///csi/csi.sock", "--drivername=csi.ploop.io",
		"--overcommit-ratio=1", "--trim-interval=1h", "--v=2", "--health-address=:9810", "--attach="+r.attach())
	for _, m := range []struct {
		name, path string
		readOnly   bool
	}{{"dev", "/dev", false}, {"sys", "/sys", false}, {"lib-modules", "/lib/modules", true}, {"socket-dir", "/csi", false}} {
		got := mount(t, nd, m.name)
		if got.MountPath != m.path || got.ReadOnly != m.readOnly {
			t.Errorf("node mount %s: %s read-only %v, want %s read-only %v", m.name, got.MountPath, got.ReadOnly, m.path, m.readOnly)
		}
		if v := volume(t, ns, m.name); m.name != "socket-dir" && (v.HostPath == nil || v.HostPath.Path != m.path) {
			t.Errorf("node volume %s is not the host's %s: %+v", m.name, m.path, v.VolumeSource)
		}
	}
	// No CPU limit by default: Go sizes GOMAXPROCS from it.
	for _, c := range append(slices.Clone(ns.InitContainers), ns.Containers...) {
		if _, ok := c.Resources.Limits[corev1.ResourceCPU]; ok {
			t.Errorf("node container %s has a CPU limit", c.Name)
		}
	}
	load := container(t, ns, "load-nbd")
	if script := strings.Join(load.Command, " "); !strings.Contains(script, "modprobe nbd") || !strings.Contains(script, "no nbd module") {
		t.Errorf("the init container does not load nbd with a clear error: %q", load.Command)
	}
	if load.Image != nd.Image {
		t.Errorf("the init container's image %s is not the driver's %s", load.Image, nd.Image)
	}
	if r.sidecars() {
		r.wantArgs(container(t, ns, "liveness-probe"), "--csi-address=/csi/csi.sock")
		r.wantArgs(container(t, ns, "node-driver-registrar"), "--csi-address=/csi/csi.sock")
	}
}

// e2e: the end-to-end cluster's combination. The driver registers itself
// with the kubelet; the kubelet probes the driver's own /healthz; every
// container that talks to the API server is told the forward's address;
// both pods are on the node's network, on ports apart.
func (r rendered) e2e() {
	t := r.t
	ctl, node := r.controller().Spec.Template.Spec, r.node().Spec.Template.Spec
	for name, spec := range map[string]corev1.PodSpec{"controller": ctl, "node": node} {
		if !spec.HostNetwork || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
			t.Errorf("%s: hostNetwork %v, dnsPolicy %q", name, spec.HostNetwork, spec.DNSPolicy)
		}
		drv := container(t, spec, "ploop-csi")
		if p := drv.LivenessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" || p.HTTPGet.Port.StrVal != "health" {
			t.Errorf("%s: the liveness probe is not the driver's own /healthz: %+v", name, p)
		}
		for _, port := range drv.Ports {
			if port.Name == "probe" {
				t.Errorf("%s: a probe port without the liveness-probe sidecar", name)
			}
		}
	}
	var names []string
	for _, c := range node.Containers {
		names = append(names, c.Name)
	}
	if !reflect.DeepEqual(names, []string{"ploop-csi"}) {
		t.Errorf("node containers %q, want the driver alone", names)
	}
	nd := container(t, node, "ploop-csi")
	r.wantArgs(nd, "--registration-dir=/registration", "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.ploop.io/csi.sock")
	if m := mount(t, nd, "registration-dir"); m.MountPath != "/registration" {
		t.Errorf("registration dir mounted at %s", m.MountPath)
	}
	if v := volume(t, node, "registration-dir"); v.HostPath == nil || v.HostPath.Path != "/var/lib/kubelet/plugins_registry" {
		t.Errorf("registration dir volume %+v", v.VolumeSource)
	}
	r.wantArgs(container(t, ctl, "ploop-csi"), "--health-address=:9811")
	r.wantArgs(nd, "--health-address=:9810")
	for _, c := range []corev1.Container{nd, container(t, ctl, "ploop-csi"), container(t, ctl, "csi-provisioner"),
		container(t, ctl, "csi-snapshotter"), container(t, ctl, "csi-resizer")} {
		env := map[string]string{}
		for _, e := range c.Env {
			env[e.Name] = e.Value
		}
		if env["KUBERNETES_SERVICE_HOST"] != "192.0.2.100" || env["KUBERNETES_SERVICE_PORT"] != "6443" {
			t.Errorf("%s does not reach the API server through the forward: %v", c.Name, env)
		}
	}
}

func (r rendered) localMode() {
	t := r.t
	d := as[storagev1.CSIDriver](t, find(r.objs, "CSIDriver", "csi.ploop.io"))
	if !*d.Spec.StorageCapacity {
		t.Error("CSIDriver storageCapacity is false in local mode")
	}
	spec := r.controller().Spec.Template.Spec
	r.wantArgs(container(t, spec, "csi-provisioner"), "--enable-capacity", "--capacity-ownerref-level=2")
	r.noArgs(container(t, spec, "ploop-csi"), "--storage-mode", "--storage-root")
	if sc := spec.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser == 0 {
		t.Errorf("the controller does not run as non-root: %+v", sc)
	}
	ns := r.node().Spec.Template.Spec
	nd := container(t, ns, "ploop-csi")
	r.noArgs(nd, "--storage-mode")
	r.wantArgs(nd, "--storage-root=/var/lib/ploop-csi")
	v := volume(t, ns, "storage-root")
	if v.HostPath == nil || v.HostPath.Path != "/var/lib/ploop-csi" || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate {
		t.Errorf("storage root volume %+v", v.VolumeSource)
	}
	r.kubeletDir("/var/lib/kubelet")
}

func (r rendered) sharedMode(root string) {
	t := r.t
	d := as[storagev1.CSIDriver](t, find(r.objs, "CSIDriver", "csi.ploop.io"))
	if *d.Spec.StorageCapacity {
		t.Error("CSIDriver storageCapacity is true in shared mode, where capacity has no topology")
	}
	dep := r.controller()
	if *dep.Spec.Replicas != 1 || dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
		t.Errorf("shared mode: %d controller replicas, strategy %q; the root's catalogue has one owner (1, Recreate)",
			*dep.Spec.Replicas, dep.Spec.Strategy.Type)
	}
	for _, sc := range ofKind(r.objs, "StorageClass") {
		if sc.GetName() == "simfs" {
			t.Error("shared mode renders the simfs StorageClass, whose volumes need a node's own root")
		}
	}
	spec := dep.Spec.Template.Spec
	r.noArgs(container(t, spec, "csi-provisioner"), "--enable-capacity", "--capacity-ownerref-level")
	drv := container(t, spec, "ploop-csi")
	r.wantArgs(drv, "--storage-mode=shared", "--storage-root="+root, "--overcommit-ratio=1")
	if m := mount(t, drv, "storage-root"); m.MountPath != root {
		t.Errorf("the controller mounts the shared root at %s", m.MountPath)
	}
	ns := r.node().Spec.Template.Spec
	r.wantArgs(container(t, ns, "ploop-csi"), "--storage-mode=shared", "--storage-root="+root)
	for name, s := range map[string]corev1.PodSpec{"controller": spec, "node": ns} {
		v := volume(t, s, "storage-root")
		if v.HostPath == nil || v.HostPath.Path != root || *v.HostPath.Type != corev1.HostPathDirectory {
			t.Errorf("%s: the shared root must already exist (type Directory): %+v", name, v.VolumeSource)
		}
	}
}

func (r rendered) noMetrics() {
	for _, k := range []string{"Service", "ServiceMonitor"} {
		if len(ofKind(r.objs, k)) != 0 {
			r.t.Errorf("a %s is rendered with metrics off", k)
		}
	}
	r.noArgs(container(r.t, r.controller().Spec.Template.Spec, "ploop-csi"), "--metrics-address")
	r.noArgs(container(r.t, r.node().Spec.Template.Spec, "ploop-csi"), "--metrics-address")
}

func (r rendered) metrics() {
	t := r.t
	pods := map[string]corev1.PodTemplateSpec{"controller": r.controller().Spec.Template, "node": r.node().Spec.Template}
	svcs := ofKind(r.objs, "Service")
	if len(svcs) != 2 {
		t.Fatalf("%d metrics Services, want 2", len(svcs))
	}
	sm := find(r.objs, "ServiceMonitor", "ploop-csi")
	if sm == nil {
		t.Fatal("no ServiceMonitor")
	}
	smSel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
	for component, pod := range pods {
		drv := container(t, pod.Spec, "ploop-csi")
		r.wantArgs(drv, "--metrics-address=:8080")
		if !slices.ContainsFunc(drv.Ports, func(p corev1.ContainerPort) bool { return p.Name == "metrics" && p.ContainerPort == 8080 }) {
			t.Errorf("%s: no metrics port 8080", component)
		}
		svc := as[corev1.Service](t, find(r.objs, "Service", "ploop-csi-"+component+"-metrics"))
		if !selects(svc.Spec.Selector, pod.Labels) {
			t.Errorf("the %s metrics Service selects %v, not its pods (%v)", component, svc.Spec.Selector, pod.Labels)
		}
		if !selects(smSel, svc.Labels) {
			t.Errorf("the ServiceMonitor selects %v, not the %s Service (%v)", smSel, component, svc.Labels)
		}
	}
}

func selects(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func (r rendered) kubeletDir(dir string) {
	t := r.t
	ns := r.node().Spec.Template.Spec
	nd := container(t, ns, "ploop-csi")
	r.wantArgs(nd, "--kubelet-dir="+dir)
	m := mount(t, nd, "kubelet-dir")
	if m.MountPath != dir || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("kubelet dir mount %+v, want %s Bidirectional", m, dir)
	}
	for name, path := range map[string]string{"kubelet-dir": dir, "socket-dir": dir + "/plugins/csi.ploop.io", "registration-dir": dir + "/plugins_registry"} {
		if v := volume(t, ns, name); v.HostPath == nil || v.HostPath.Path != path {
			t.Errorf("volume %s: %+v, want host path %s", name, v.VolumeSource, path)
		}
	}
	reg := container(t, ns, "node-driver-registrar")
	r.wantArgs(reg, "--csi-address=/csi/csi.sock", "--kubelet-registration-path="+dir+"/plugins/csi.ploop.io/csi.sock")
	if m := mount(t, reg, "registration-dir"); m.MountPath != "/registration" {
		t.Errorf("the registrar mounts the registration dir at %s", m.MountPath)
	}
}

func (r rendered) snapshotController() {
	t := r.t
	d := as[appsv1.Deployment](t, find(r.objs, "Deployment", "ploop-csi-snapshot-controller"))
	spec := d.Spec.Template.Spec
	if spec.ServiceAccountName != "ploop-csi-snapshot-controller" {
		t.Errorf("snapshot controller service account %q", spec.ServiceAccountName)
	}
	c := container(t, spec, "snapshot-controller")
	if !strings.HasPrefix(c.Image, "registry.k8s.io/sig-storage/snapshot-controller:v8.") {
		t.Errorf("snapshot controller image %s, want snapshot-controller v8.x", c.Image)
	}
	r.wantArgs(c, "--leader-election=true")
}

// classes checks which StorageClasses and the VolumeSnapshotClass exist.
func (r rendered) classes(ext4, xfs, simfs, snapshotClass, ext4Default bool) {
	t := r.t
	for _, want := range []struct {
		name   string
		exists bool
		params map[string]string
	}{
		{"ploop-ext4", ext4, map[string]string{"type": "ploop", "csi.storage.k8s.io/fstype": "ext4"}},
		{"ploop-xfs", xfs, map[string]string{"type": "ploop", "csi.storage.k8s.io/fstype": "xfs"}},
		{"simfs", simfs, map[string]string{"type": "simfs"}},
	} {
		u := find(r.objs, "StorageClass", want.name)
		if (u != nil) != want.exists {
			t.Errorf("StorageClass %s rendered: %v, want %v", want.name, u != nil, want.exists)
			continue
		}
		if u == nil {
			continue
		}
		sc := as[storagev1.StorageClass](t, u)
		if sc.Provisioner != "csi.ploop.io" || *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer ||
			!*sc.AllowVolumeExpansion || !reflect.DeepEqual(sc.Parameters, want.params) {
			t.Errorf("StorageClass %s: %+v", want.name, sc)
		}
		isDefault := sc.Annotations["storageclass.kubernetes.io/is-default-class"] == "true"
		if isDefault != (want.name == "ploop-ext4" && ext4Default) {
			t.Errorf("StorageClass %s is the default: %v", want.name, isDefault)
		}
	}
	vsc := find(r.objs, "VolumeSnapshotClass", "ploop-csi")
	if (vsc != nil) != snapshotClass {
		t.Errorf("VolumeSnapshotClass rendered: %v, want %v", vsc != nil, snapshotClass)
	}
	if vsc != nil {
		if p, _, _ := unstructured.NestedString(vsc.Object, "deletionPolicy"); p != "Delete" {
			t.Errorf("VolumeSnapshotClass deletionPolicy %q", p)
		}
		if d, _, _ := unstructured.NestedString(vsc.Object, "driver"); d != "csi.ploop.io" {
			t.Errorf("VolumeSnapshotClass driver %q", d)
		}
	}
}

// TestSchemaRejects: values.schema.json turns a typo or a wrong type into
// a failed install, with either Helm.
func TestSchemaRejects(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want string // in helm's error
	}{
		{"unknown key", []string{"--set", "replicas=3"}, "replicas"},
		{"unknown nested key", []string{"--set", "controller.replica=3"}, "replica"},
		{"unknown image key", []string{"--set", "image.provisioner.version=v6.4.0"}, "version"},
		{"string for integer", []string{"--set", "controller.replicas=two"}, "replicas"},
		{"string for boolean", []string{"--set-string", "metrics.enabled=true"}, "enabled"},
		{"string for number", []string{"--set-string", "overcommitRatio=2"}, "overcommitRatio"},
		{"bad mode", []string{"--set", "storage.mode=nfs"}, "mode"},
		{"bad attach", []string{"--set", "node.attach=iscsi"}, "attach"},
		{"latest tag", []string{"--set", "image.resizer.tag=latest"}, "tag"},
		{"empty sidecar tag", []string{"--set", "image.resizer.tag="}, "tag"},
		{"bad digest", []string{"--set", "image.driver.digest=sha256:1234"}, "digest"},
		{"relative kubelet dir", []string{"--set", "kubeletDir=var/lib/kubelet"}, "kubeletDir"},
		{"bad duration", []string{"--set", "trimInterval=hourly"}, "trimInterval"},
	}
	for _, v := range helms {
		for _, c := range cases {
			t.Run(v+"/"+c.name, func(t *testing.T) {
				out, err := helm(t, v, append(templateArgs(combo{}), c.args...)...)
				if err == nil {
					t.Fatalf("helm template %s succeeded:\n%.300s", strings.Join(c.args, " "), out)
				}
				msg := err.Error()
				if !strings.Contains(msg, "schema") || !strings.Contains(msg, c.want) {
					t.Errorf("helm template %s failed, but not by the schema on %s: %v", strings.Join(c.args, " "), c.want, err)
				}
			})
		}
	}
}

// TestServiceMonitorNeedsMetrics: a ServiceMonitor with nothing to scrape
// is refused with the reason.
func TestServiceMonitorNeedsMetrics(t *testing.T) {
	for _, v := range helms {
		_, err := helm(t, v, templateArgs(combo{set: []string{"metrics.serviceMonitor.enabled=true"}})...)
		if err == nil || !strings.Contains(err.Error(), "needs metrics.enabled") {
			t.Errorf("helm %s: serviceMonitor without metrics: %v", v, err)
		}
	}
}
