#!/usr/bin/env bash
# bench-compact.sh: offline compaction in one run, against the reference.
#   A ploop image of SIZE MiB whose every other cluster is allocated but all
#   zero (what a guest's discards leave behind when they were written as
#   zeros) is compacted with `ploopctl compact` and, from an identical copy,
#   rewritten by `qemu-img convert` (which drops zero clusters the same way),
#   each followed by an fdatasync of its output. Prints the throughput of
#   both, their ratio, and the share of the file given back.
# Knobs: BENCH_COMPACT_SIZE (MiB, default 1024), BENCH_COMPACT_DIR (scratch).
set -euo pipefail

SIZE=${BENCH_COMPACT_SIZE:-1024}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
for tool in go qemu-img awk date dd stat; do
  command -v "$tool" >/dev/null || { echo "bench-compact: $tool is required" >&2; exit 1; }
done
work=$(mktemp -d "${BENCH_COMPACT_DIR:-${TMPDIR:-/tmp}}/bench-compact.XXXXXX")
trap 'rm -rf "$work"' EXIT
go build -C "$ROOT" -o "$work/ploopctl" ./cmd/ploopctl
P=$work/ploopctl

now() { date +%s%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1e6 }'; }

echo "bench-compact: $SIZE MiB image, every other 1 MiB cluster all zero"
truncate -s "${SIZE}M" "$work/data.raw"
for ((i = 0; i < SIZE; i += 2)); do
  dd if=/dev/urandom of="$work/data.raw" bs=1M seek="$i" count=1 conv=notrunc status=none
done
"$P" init -s "${SIZE}M" "$work/vol" >/dev/null
rm "$work/vol/root.hds"
# -S 0: no sparse detection, so the zero clusters are written (allocated).
qemu-img convert -S 0 -f raw -O parallels "$work/data.raw" "$work/vol/root.hds"
rm "$work/data.raw"
cp "$work/vol/root.hds" "$work/ref.hds"
sync
before=$(stat -c %s "$work/vol/root.hds")

t0=$(now)
qemu-img convert -f parallels -O parallels "$work/ref.hds" "$work/q.hds"
sync -d "$work/q.hds"
t1=$(now)
qemu_ms=$(ms "$t0" "$t1")
t0=$(now); "$P" compact "$work/vol" >/dev/null; t1=$(now)
ours_ms=$(ms "$t0" "$t1")
after=$(stat -c %s "$work/vol/root.hds")
qsize=$(stat -c %s "$work/q.hds")

qemu-img compare -f parallels -F parallels "$work/vol/root.hds" "$work/ref.hds" >/dev/null ||
  { echo "bench-compact: the compacted image reads differently" >&2; exit 1; }

printf '\n%-34s %12s %12s %14s\n' "compact $SIZE MiB" "ms" "MiB/s" "result bytes"
printf '%-34s %12s %12s %14s\n' "ploopctl compact" "$ours_ms" "$(awk -v m="$SIZE" -v t="$ours_ms" 'BEGIN { printf "%.0f", m / (t / 1000) }')" "$after"
printf '%-34s %12s %12s %14s\n' "qemu-img convert+fdatasync" "$qemu_ms" "$(awk -v m="$SIZE" -v t="$qemu_ms" 'BEGIN { printf "%.0f", m / (t / 1000) }')" "$qsize"
printf 'ratio ours/qemu (throughput): %s\n' "$(awk -v a="$ours_ms" -v b="$qemu_ms" 'BEGIN { printf "%.2f", b / a }')"
printf 'file size %d -> %d bytes: %.1f%% given back (half the data was zeros)\n' "$before" "$after" \
  "$(awk -v a="$before" -v b="$after" 'BEGIN { print 100 * (a - b) / a }')"
