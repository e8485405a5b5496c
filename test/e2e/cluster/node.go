package cluster

import (
	"fmt"
	"strings"

	"github.com/ploop-csi/ploop-csi/test/e2e/vmtest"
)

// APIAddr is where the guest reaches the API server: an address of the
// guest net that qemu relays to the server's loopback port on the host.
const (
	APIIP   = "192.0.2.100"
	APIPort = 6443
	APIAddr = "192.0.2.100:6443"
)

// StorageRoot is the node's storage root (the chart's default hostPath).
const StorageRoot = "/var/lib/ploop-csi"

// PodSubnet is the range the guest's bridge gives pods.
const PodSubnet = "10.244.0.0/24"

// Files of the exchange directory, which the guest sees at the same path.
const (
	nodeScript       = "node.sh"
	containerdConfig = "containerd.toml"
	kubeletConfig    = "kubelet.yaml"
	kubeletKubecfg   = "kubelet.kubeconfig"
	caFile           = "ca.crt"
	cniDir           = "cni"
	imagesDir        = "images"
	stopFile         = "stop"
	readyFile        = "node-started"
	containerdLog    = "containerd.log"
	kubeletLog       = "kubelet.log"
	podLogsDir       = "pod-logs"
	modulesDir       = "modules"
)

// guestScript is the node's life in the guest: state on tmpfs (the host
// root is read-only there, and the kubelet insists on /var/lib/kubelet
// and /var/log), containerd, the images, the kubelet; then it waits for
// the host to create the stop file. The VM powers off after it, which
// ends every process and mount of the node.
func guestScript(xchg, node string) string {
	return strings.NewReplacer("$X", shellQuote(xchg), "$NODE", shellQuote(node), "$NODEIP", vmtest.GuestIP).Replace(`set -u
log() { echo "node: $* (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
fail() { log "FAILED: $*"; exit 1; }
mount -t tmpfs -o mode=0755 tmpfs /var/lib || fail "tmpfs /var/lib"
mount -t tmpfs -o mode=0755 tmpfs /var/log || fail "tmpfs /var/log"
mkdir -p /var/lib/kubelet /var/lib/containerd /var/log/pods /var/log/containers /run/containerd
# The storage root: ext4 with enforced project quota (simfs) on a loop
# device, since tmpfs has neither quota nor O_DIRECT.
truncate -s 3G /tmp/storage-root.img || fail "storage root image"
dev=$(losetup -f --show /tmp/storage-root.img) || fail "losetup"
mkfs.ext4 -q -O quota,project -E nodiscard $dev || fail "mkfs storage root"
mkdir -p ` + StorageRoot + ` && mount -o prjquota $dev ` + StorageRoot + ` || fail "mount storage root"
# Bidirectional mount propagation (the node plugin's mounts reaching the
# kubelet and the pods) needs shared mounts.
mount --make-rshared / || fail "make / rshared"
# The kubelet puts pods in cgroups below the root, with these controllers.
echo "+cpu +cpuset +memory +pids +io" > /sys/fs/cgroup/cgroup.subtree_control || fail "cgroup controllers"
containerd --config $X/` + containerdConfig + ` > $X/` + containerdLog + ` 2>&1 &
i=0
until [ -S /run/containerd/containerd.sock ]; do
	i=$((i+1)); [ $i -lt 600 ] || fail "containerd did not start (see ` + containerdLog + `)"
	sleep 0.1
done
log "containerd ready"
for img in $X/` + imagesDir + `/*.tar; do
	ctr -n k8s.io images import "$img" >/dev/null || fail "import $img"
done
log "images imported: $(ctr -n k8s.io images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
kubelet --config=$X/` + kubeletConfig + ` --kubeconfig=$X/` + kubeletKubecfg + ` \
	--root-dir=/var/lib/kubelet --cert-dir=/var/lib/kubelet/pki \
	--hostname-override=$NODE --node-ip=$NODEIP --v=2 > $X/` + kubeletLog + ` 2>&1 &
kubelet=$!
log "kubelet started"
touch $X/` + readyFile + `
while [ ! -e $X/` + stopFile + ` ]; do
	kill -0 $kubelet 2>/dev/null || fail "the kubelet exited (see ` + kubeletLog + `)"
	sleep 0.2
done
log "stopping"
# The pods' logs go back to the host (the API server cannot fetch them:
# it has no way to the guest's kubelet).
cp -r /var/log/pods $X/` + podLogsDir + ` 2>/dev/null
exit 0
`)
}

func containerdTOML(xchg string) string {
	return fmt.Sprintf(`version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  # The guest's processes may not lower their OOM score below the
  # init's, which containerd's default would try for the pause process.
  restrict_oom_score_adj = true
  enable_unprivileged_ports = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %q
`, ToolsImage, xchg+"/"+cniDir)
}

// cniConflist is a bridge in the guest with addresses from PodSubnet: pods
// reach each other and the node, nothing else (no masquerade, and the
// guest's only link is qemu's restricted net).
const cniConflist = `{
  "cniVersion": "1.0.0",
  "name": "e2e",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "` + PodSubnet + `"}]]}}
  ]
}
`

func kubeletYAML(xchg string) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %q
authorization:
  mode: Webhook
readOnlyPort: 0
# Volume metrics (NodeGetVolumeStats) within seconds, not a minute.
volumeStatsAggPeriod: 5s
# A running pod's volumes are looked at again (NodeExpandVolume after an
# expansion) when the kubelet syncs the pod: every 10 s, not every minute.
syncFrequency: 10s
serializeImagePulls: false
# Images come from the exchange directory, never from a registry: none is
# ever collected.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`, xchg+"/"+caFile)
}

// shellQuote quotes s for sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
