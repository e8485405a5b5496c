#!/usr/bin/env bash
# make demo: the data path of a ploop volume, end to end, on a real kernel.
# The CSI driver itself is not built yet (see `issues`); this runs what a node
# plugin will do for one volume: create a thin image, attach it to /dev/nbdN
# through our NBD server, put ext4 on it, write, detach, check, export.
# The host kernel here has no nbd, so the guest part runs in the test VM
# unless this machine has /sys/module/nbd (or can load it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x bin/ploopctl ] || go build -o bin/ ./cmd/...
if [ "$(id -u)" = 0 ] && modprobe nbd nbds_max=16 2>/dev/null && [ -e /dev/nbd0 ]; then
  exec bash test/demo-guest.sh "$PWD/bin/ploopctl"
fi
echo "demo: this kernel has no nbd driver; running the demo in the test VM"
exec go run ./test/e2e/cmd/vmrun -- bash "$PWD/test/demo-guest.sh" "$PWD/bin/ploopctl"
