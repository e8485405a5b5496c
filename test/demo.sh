#!/usr/bin/env bash
# make demo: ploop-csi's CSI lifecycle, step by step, on a real kernel
# (test/e2e/demo prints and checks each step). It needs root and a kernel
# with nbd, loop and ext4 project quota; when this machine lacks any of
# them, it runs in the test VM (test/e2e/vmtest), which has them all.
# Expects bin/ploop-csi, bin/csidemo and bin/vmrun (make demo builds them).
set -euo pipefail
cd "$(dirname "$0")/.."
for b in ploop-csi csidemo vmrun; do
  [ -x "bin/$b" ] || { echo "demo: bin/$b is missing: run make demo" >&2; exit 2; }
done

# has_module NAME: loaded, built in, or loadable now.
has_module() {
  [ -d "/sys/module/$1" ] && return 0
  grep -qs "/$1.ko" "/lib/modules/$(uname -r)/modules.builtin" && return 0
  modprobe "$1" 2>/dev/null && [ -d "/sys/module/$1" ]
}

why=
if [ "$(id -u)" != 0 ]; then
  why="it needs root"
elif ! has_module nbd || [ ! -e /sys/block/nbd0 ]; then
  why="this kernel has no nbd driver"
elif ! has_module quota_v2; then
  why="this kernel has no quota support (quota_v2)"
elif ! has_module loop; then
  why="this kernel has no loop devices"
fi
if [ -z "$why" ]; then
  exec bin/csidemo --driver "$PWD/bin/ploop-csi"
fi
echo "demo: $why here, so it runs in the test VM (Debian's kernel under qemu; see test/e2e/README.md)"
exec bin/vmrun -timeout 20m -- "$PWD/bin/csidemo" --driver "$PWD/bin/ploop-csi"
