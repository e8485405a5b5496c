#!/usr/bin/env bash
# bench-stack.sh: ploop stack operations (offline) in one run.
#   snapshot and clone time on a stack with SMALL MiB written and with BIG MiB
#   written: both are O(1), so the ratio big/small should be about 1;
#   snapshot-delete (merge) throughput against qemu-img convert of the same
#   data (parallels -> parallels).
# Knobs: BENCH_STACK_SMALL (default 100 MiB), BENCH_STACK_BIG (10240 MiB),
# BENCH_STACK_MERGE (1024 MiB), BENCH_STACK_DIR (scratch dir).
set -euo pipefail

SMALL=${BENCH_STACK_SMALL:-100}
BIG=${BENCH_STACK_BIG:-10240}
MERGE=${BENCH_STACK_MERGE:-1024}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
for tool in go qemu-img awk date; do
  command -v "$tool" >/dev/null || { echo "bench-stack: $tool is required" >&2; exit 1; }
done
work=$(mktemp -d "${BENCH_STACK_DIR:-${TMPDIR:-/tmp}}/bench-stack.XXXXXX")
trap 'rm -rf "$work"' EXIT
go build -C "$ROOT" -o "$work/ploopctl" ./cmd/ploopctl
P=$work/ploopctl

now() { date +%s%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1e6 }'; }

# stack_with MIB DIR [SIZE]: a stack of SIZE MiB (default MIB) whose base
# holds MIB MiB of random data.
stack_with() {
  local mib=$1 dir=$2 size=${3:-$1}
  head -c "$((mib << 20))" /dev/urandom >"$work/data.raw"
  truncate -s "${size}M" "$work/data.raw"
  "$P" init -s "${size}M" "$dir" >/dev/null
  rm "$dir/root.hds"
  "$P" convert -O ploop "$work/data.raw" "$dir/root.hds"
  rm "$work/data.raw"
}

# min_ms A B: the smaller of two millisecond figures.
min_ms() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b < a) ? b : a }'; }

# Both stacks have the same virtual size (BIG), so the BAT sizes match and
# only the amount of data written differs. Each time is the best of 5.
declare -A snap clone
for mib in "$SMALL" "$BIG"; do
  echo "bench-stack: stack of $BIG MiB with $mib MiB written"
  stack_with "$mib" "$work/s$mib" "$BIG"
  sync
  snap[$mib]= clone[$mib]=
  for i in 1 2 3 4 5; do
    t0=$(now); g=$("$P" snapshot "$work/s$mib"); t1=$(now)
    snap[$mib]=$(min_ms "${snap[$mib]}" "$(ms "$t0" "$t1")")
    t0=$(now); "$P" clone -u "$g" "$work/s$mib" "$work/c$mib-$i"; t1=$(now)
    clone[$mib]=$(min_ms "${clone[$mib]}" "$(ms "$t0" "$t1")")
  done
  rm -rf "$work/s$mib" "$work/c$mib"-*
done

echo "bench-stack: merge of $MERGE MiB"
stack_with "$MERGE" "$work/m"
g=$("$P" snapshot "$work/m")
cp "$work/m/root.hds" "$work/ref.hds"
sync
# Both sides do the same work: the merge copies the clusters, fsyncs and
# removes the merged delta, so the reference is qemu-img convert of a copy
# of that delta, an fdatasync of its output and the removal of the copy.
t0=$(now)
qemu-img convert -f parallels -O parallels "$work/ref.hds" "$work/q.hds"
sync -d "$work/q.hds"
rm "$work/ref.hds"
t1=$(now)
qemu_ms=$(ms "$t0" "$t1")
t0=$(now); "$P" snapshot-delete -u "$g" "$work/m"; t1=$(now)
merge_ms=$(ms "$t0" "$t1")

printf '\n%-34s %12s %12s %8s\n' "operation" "${SMALL}MiB" "${BIG}MiB" "ratio"
for op in snapshot clone; do
  if [ $op = snapshot ]; then a=${snap[$SMALL]} b=${snap[$BIG]}; else a=${clone[$SMALL]} b=${clone[$BIG]}; fi
  printf '%-34s %10s ms %10s ms %8s\n' "$op (ploopctl, offline)" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b / a }')"
done
printf '\n%-34s %12s %12s\n' "merge $MERGE MiB" "ms" "MiB/s"
printf '%-34s %12s %12s\n' "ploopctl snapshot-delete" "$merge_ms" "$(awk -v m="$MERGE" -v t="$merge_ms" 'BEGIN { printf "%.0f", m / (t / 1000) }')"
printf '%-34s %12s %12s\n' "qemu-img convert+fdatasync+rm" "$qemu_ms" "$(awk -v m="$MERGE" -v t="$qemu_ms" 'BEGIN { printf "%.0f", m / (t / 1000) }')"
printf 'ratio ours/qemu (throughput): %s\n' "$(awk -v a="$merge_ms" -v b="$qemu_ms" 'BEGIN { printf "%.2f", b / a }')"
