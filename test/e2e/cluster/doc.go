// Package cluster is a one-node Kubernetes cluster for the end-to-end
// tests, built from the project's own pieces on a machine whose kernel has
// no nbd and no quota.
//
// The control plane runs on the host: etcd and kube-apiserver from package
// kubeapi, with kube-controller-manager and kube-scheduler of the same
// release beside it. The node runs in the test VM (package vmtest), the
// only place with the kernel the driver needs: Debian's containerd and runc
// and a kubelet of the same release, with their state on the guest's tmpfs.
// The guest has no network but qemu's restricted user net: it reaches the
// API server at APIAddr, a documentation-range address that qemu relays to
// the host's loopback port of the server through a socat per connection,
// and nothing else. The serving certificate carries that address.
//
// No registry is involved: images are OCI tarballs in the VM's exchange
// directory, imported into containerd before the kubelet starts; the
// sandbox ("pause") image is the small tools image of this package
// (busybox), which the tests' own pods use too. Pods get addresses on a
// bridge inside the guest (the Debian CNI plugins); there is no kube-proxy,
// so a pod that talks to the API server uses hostNetwork and APIAddr.
package cluster
