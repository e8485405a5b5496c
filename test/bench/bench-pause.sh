#!/usr/bin/env bash
# bench-pause.sh: how online operations that move data affect I/O.
#   Online compaction and a relocating grow each move SIZE MiB inside a
#   served stack while four writers keep writing 4 KiB blocks
#   (BenchmarkOnlinePause in pkg/ploop). Printed side by side: the I/O
#   pauses the operation took (none are expected: clusters move under
#   their own locks), the longest write the writers saw during the move and,
#   as references from the same run, the longest write over as long a time
#   without an operation and the time the move took (what I/O would have
#   waited had the data moved inside a pause).
# Knobs: BENCH_PAUSE_MIB (space-separated MiB moved, default "32 1024").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZES=${BENCH_PAUSE_MIB:-32 1024}
out=$(PLOOP_BENCH_PAUSE_MIB="${SIZES// /:}" go test -C "$ROOT" -run '^$' -bench '^BenchmarkOnlinePause$' -benchtime 1x -timeout 60m ./pkg/ploop)
printf '%-16s %7s %10s %16s %16s %10s %10s\n' "moved" "pauses" "longest" "max write, move" "max write, idle" "move took" "writes/s"
awk '/^BenchmarkOnlinePause\// {
  name = $1; sub(/^BenchmarkOnlinePause\//, "", name); sub(/-[0-9]+$/, "", name)
  for (i = 3; i < NF; i += 2) v[$(i + 1)] = $i
  printf "%-16s %7d %7.2f ms %13.2f ms %13.2f ms %7d ms %10.0f\n", name, v["pauses"], v["pause-ms"], v["max-write-ms"], v["max-write-idle-ms"], v["op-ms"], v["writes/s"]
}' <<<"$out"
