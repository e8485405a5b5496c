#!/usr/bin/env bash
# bench-driver.sh: the CSI driver itself, measured in one run of
# test/e2e/cmd/benchdriver (read its doc for what each table means):
#   1. fio (direct I/O) on the nbd device of a staged Block-mode ploop volume
#      against the same job on a loop device (--direct-io=on) over a raw file
#      and on qemu-nbd --connect of a parallels image, all thin, same size,
#      same file system: 4 KiB random read/write QD16, 1 MiB sequential
#      read/write QD4; goals ploop >= 1.0x qemu-nbd and >= 0.8x loop;
#   2. CreateSnapshot latency of an attached volume with 100 MiB and 2 GiB
#      written before each snapshot (3 samples each); goal: the ratio about 1;
#   3. ploop-csi's RSS with 0, 1 and 16 sparse 1 TiB volumes staged; goal
#      at most 16 MiB per volume.
# The VM boots Debian's 6.12 kernel, which has ublk: the fio table then has
# two more devices, a Block volume the driver attaches through ublk (goals
# >= 3x the driver's nbd path and >= 0.6x loop) and a ploop image served
# inline by pkg/ublk in the bench process.
# It needs root and a kernel with nbd and loop, so it runs in the test VM
# (test/e2e/vmtest; one boot) unless BENCH_DRIVER_VM=0 says to run it here.
# Under software emulation (no KVM) the absolute numbers are the emulator's
# and vary a lot on a busy host; the ratios, measured side by side (fio: 3
# interleaved rounds, with the range of the per-round ratios), are what to
# read. About 20 minutes under TCG, mostly writing the 2 GiB volume 3 times.
#
# Knobs: BENCH_DRIVER_VM (1: in the VM, the default; 0: here),
# BENCH_DRIVER_KERNEL (the guest's kernel package, default
# linux-image-6.12-amd64; "" for the harness's stock kernel),
# BENCH_DRIVER_MEM (guest MiB, default 6144: the guest's tmpfs holds the
# storage root, up to twice the 2 GiB volume), BENCH_DRIVER_ARGS (extra
# benchdriver flags, e.g. "--fio-rounds 3 --sections fio").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
for tool in go fio qemu-img qemu-nbd; do
  command -v "$tool" >/dev/null || { echo "bench-driver: $tool is required (see .ci/deps)" >&2; exit 1; }
done

# The guest sees the host's root read-only, but not its /tmp: the binaries
# go to bin/ as make build puts them.
echo "bench-driver: building ploop-csi, benchdriver and vmrun into bin/"
go build -o bin/ ./cmd/ploop-csi ./test/e2e/cmd/benchdriver ./test/e2e/cmd/vmrun

# shellcheck disable=SC2206 # the extra flags are meant to split
extra=(${BENCH_DRIVER_ARGS:-})
start=$(date +%s)
status=0
if [ "${BENCH_DRIVER_VM:-1}" = 0 ]; then
  bin/benchdriver --driver "$PWD/bin/ploop-csi" "${extra[@]}" || status=$?
else
  bin/vmrun -mem "${BENCH_DRIVER_MEM:-6144}" -timeout 60m -kernel "${BENCH_DRIVER_KERNEL-linux-image-6.12-amd64}" -- \
    "$PWD/bin/benchdriver" --driver "$PWD/bin/ploop-csi" --tmpdir /tmp "${extra[@]}" || status=$?
fi
echo "bench-driver: wall time $(( $(date +%s) - start )) s (VM boot included), exit status $status"
exit "$status"
