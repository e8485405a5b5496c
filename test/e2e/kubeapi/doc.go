// Package kubeapi runs a real Kubernetes control plane's storage half — one
// kube-apiserver over one etcd — for Go tests that need the API server's own
// validation, defaulting, subresources and RBAC rather than a fake client.
//
// The model: Binaries finds etcd (Debian's etcd-server, /usr/bin/etcd) and
// builds kube-apiserver from the Go module proxy at KubernetesVersion, since
// no release binaries can be downloaded here (DESIGN.md §10). The build is a
// throw-away module that requires k8s.io/kubernetes and replaces each of its
// ./staging modules with the published k8s.io/* release of the same version;
// the binary is cached under $PLOOP_CSI_CACHE/kube/<version>/ (default
// ~/.cache/ploop-csi), but a cold cache only costs time: 4-5 minutes on two
// cores shared with VM tests, after which a start takes a few seconds. No
// kube-controller-manager runs, so nothing creates default service accounts,
// fills the aggregated ClusterRoles (view, edit, admin) or collects garbage.
// Start launches etcd
// and kube-apiserver with their state and a fresh CA in a temporary
// directory, both listening on 127.0.0.1 only, and returns once /readyz
// answers; the caller talks to it as a system:masters client-certificate
// user, or as any user and groups it names (ConfigFor), against RBAC
// authorization. Stop kills both and removes the directory.
//
// Environment: PLOOP_CSI_SKIP_KUBE=1 lets a developer without etcd or the
// time for the first build skip these tests (ignored when CI=true: in CI a
// missing etcd or a failed build fails the test with the reason);
// PLOOP_CSI_CACHE moves the cache.
package kubeapi
