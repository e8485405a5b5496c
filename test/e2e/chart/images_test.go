package chart

import (
	"fmt"
	"path"
	"strings"
	"testing"

	"golang.org/x/mod/semver"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// minVersions are the oldest sidecars the driver is proved with (issue 12),
// by the image's last path element. An image not listed here and not the
// driver's fails the test until it gets a minimum.
var minVersions = map[string]string{
	"csi-provisioner":           "v6.3.0",
	"csi-snapshotter":           "v8.6.0",
	"csi-resizer":               "v2.2.0",
	"livenessprobe":             "v2.19.0",
	"csi-node-driver-registrar": "v2.17.0",
	// The snapshot controller of the same external-snapshotter release
	// line as the CRDs the tests install.
	"snapshot-controller": "v8.0.0",
}

const driverImage = "ploop-csi"

// imageTag splits repository[:tag][@digest] into the repository's last
// path element and the tag.
func imageTag(ref string) (name, tag string) {
	ref, _, _ = strings.Cut(ref, "@")
	repo := ref
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		repo, tag = ref[:i], ref[i+1:]
	}
	return path.Base(repo), tag
}

// checkImage says what is wrong with an image reference, or "".
func checkImage(ref string) string {
	name, tag := imageTag(ref)
	switch {
	case tag == "":
		return "has no tag"
	case strings.EqualFold(tag, "latest"):
		return "is tagged latest"
	case name == driverImage:
		return ""
	}
	min, ok := minVersions[name]
	if !ok {
		return "is not a known sidecar: give it a minimum version in minVersions"
	}
	if !semver.IsValid(tag) {
		return fmt.Sprintf("has tag %q, not a version to compare with %s", tag, min)
	}
	if semver.Compare(tag, min) < 0 {
		return fmt.Sprintf("is older than %s", min)
	}
	return ""
}

func TestCheckImage(t *testing.T) {
	cases := []struct {
		ref  string
		okay bool
	}{
		{"registry.k8s.io/sig-storage/csi-provisioner:v6.3.0", true},
		{"registry.k8s.io/sig-storage/csi-provisioner:v6.4.0@sha256:" + strings.Repeat("a", 64), true},
		{"registry.k8s.io/sig-storage/csi-provisioner:v6.2.9", false},
		{"registry.k8s.io/sig-storage/csi-provisioner:v5.9.0", false},
		{"registry.k8s.io/sig-storage/csi-provisioner", false},
		{"registry.k8s.io/sig-storage/csi-provisioner@sha256:" + strings.Repeat("a", 64), false},
		{"registry.k8s.io/sig-storage/csi-provisioner:latest", false},
		{"registry.k8s.io/sig-storage/csi-provisioner:canary", false},
		{"registry.k8s.io/sig-storage/csi-resizer:v2.1.0", false},
		{"registry.k8s.io/sig-storage/livenessprobe:v2.18.9", false},
		{"registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.16.0", false},
		{"registry.k8s.io/sig-storage/csi-snapshotter:v8.5.0", false},
		{"registry.k8s.io/sig-storage/snapshot-controller:v7.0.0", false},
		{"localhost:5000/ploop-csi", false},
		{"localhost:5000/ploop-csi:v0.1.0", true},
		{"ploop-csi/ploop-csi:Latest", false},
		{"example/unknown-sidecar:v1.0.0", false},
	}
	for _, c := range cases {
		if got := checkImage(c.ref); (got == "") != c.okay {
			t.Errorf("checkImage(%s) = %q, want okay %v", c.ref, got, c.okay)
		}
	}
}

// TestImages: every container of every combination has a pinned, recent
// enough image.
func TestImages(t *testing.T) {
	for _, c := range combos {
		t.Run(c.name, func(t *testing.T) {
			for _, u := range render(t, helmbin3, c) {
				spec := podSpec(t, u)
				if spec == nil {
					continue
				}
				for _, ct := range append(spec.InitContainers, spec.Containers...) {
					if why := checkImage(ct.Image); why != "" {
						t.Errorf("%s %s, container %s: image %s %s", u.GetKind(), u.GetName(), ct.Name, ct.Image, why)
					}
				}
			}
		})
	}
}

// podSpec is the pod template of a workload, nil for other kinds.
func podSpec(t *testing.T, u *unstructured.Unstructured) *corev1.PodSpec {
	t.Helper()
	tmpl, found, err := unstructured.NestedMap(u.Object, "spec", "template")
	if err != nil || !found {
		return nil
	}
	pt := as[corev1.PodTemplateSpec](t, &unstructured.Unstructured{Object: tmpl})
	return &pt.Spec
}
