#!/usr/bin/env bash
# bench-nbd.sh: our NBD server (ploopctl serve) on a ploop image against
#   qemu-nbd -f parallels on the same image, and
#   nbdkit's file plugin on the equivalent raw file,
# all on unix sockets, in one run:
#   sequential read/write with nbdcopy over $CONNS connections,
#   sequential 4 KiB reads with qemu-img bench (one connection, depth 32),
#   random 4 KiB read/write with fio's nbd engine ($CONNS connections, depth 32).
# Prints MiB/s or IOPS per server and the ratios ours/qemu-nbd, ours/nbdkit.
#
# Knobs: BENCH_NBD_SIZE (default 1024 MiB), BENCH_NBD_CONNS (4),
# BENCH_NBD_RUNTIME (fio seconds per test, 10), BENCH_NBD_REPEAT (runs of each
# sequential test, median kept; 3), BENCH_NBD_DIR (scratch dir).
set -euo pipefail

SIZE_MIB=${BENCH_NBD_SIZE:-1024}
CONNS=${BENCH_NBD_CONNS:-4}
RUNTIME=${BENCH_NBD_RUNTIME:-10}
REPEAT=${BENCH_NBD_REPEAT:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

for tool in go qemu-img qemu-nbd nbdkit nbdcopy fio awk; do
  command -v "$tool" >/dev/null || { echo "bench-nbd: $tool is required" >&2; exit 1; }
done

work=$(mktemp -d "${BENCH_NBD_DIR:-${TMPDIR:-/tmp}}/bench-nbd.XXXXXX")
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    # ploopctl is our child; the forked daemons are not, so poll for them.
    for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    server_pid=
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT

echo "bench-nbd: building ploopctl, making a ${SIZE_MIB} MiB image of random data in $work"
go build -C "$ROOT" -o "$work/ploopctl" ./cmd/ploopctl
raw=$work/disk.raw
img=$work/disk.hds
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$raw"
qemu-img convert -f raw -O parallels "$raw" "$img"
sock=$work/nbd.sock

wait_for_socket() {
  for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "bench-nbd: server did not create $sock" >&2; exit 1
}

start_server() { # ours|qemu|nbdkit
  rm -f "$sock"
  case $1 in
    ours)
      "$work/ploopctl" serve --socket "$sock" --export disk "$img" >"$work/uri" 2>"$work/serve.log" &
      server_pid=$!
      uri="nbd+unix:///disk?socket=$sock" ;;
    qemu)
      qemu-nbd -f parallels --socket="$sock" --shared="$CONNS" --persistent --cache=writeback \
        --aio=threads --fork --pid-file="$work/qemu.pid" "$img"
      server_pid=$(cat "$work/qemu.pid")
      uri="nbd+unix:///?socket=$sock" ;;
    nbdkit)
      nbdkit --unix "$sock" --pidfile "$work/nbdkit.pid" file "$raw"
      wait_for_socket
      server_pid=$(cat "$work/nbdkit.pid")
      uri="nbd+unix:///?socket=$sock" ;;
  esac
  wait_for_socket
}

now() { date +%s.%N; }
mibps() { awk -v s="$SIZE_MIB" -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", s / (b - a) }'; }

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }

declare -A R
measure() { # server
  local s=$1 t0 t1 out
  # Writeback left over from the previous server would slow this one's
  # writes (pages under writeback block new writes to them).
  sync
  start_server "$s"
  # Sequential runs vary a lot from one to the next on a shared machine,
  # so each is repeated and the median kept.
  local reads=() writes=() cached=()
  for _ in $(seq "$REPEAT"); do
    # Sequential read: whole image to nowhere.
    t0=$(now); nbdcopy --connections="$CONNS" --requests=16 "$uri" null: ; t1=$(now)
    reads+=("$(mibps "$t0" "$t1")")
    # Sequential write: rewrite the whole image (clusters already
    # allocated), durably: the final flush writes 1 GiB to the disk, which
    # costs every server the same.
    t0=$(now); nbdcopy --connections="$CONNS" --requests=16 --flush "$raw" "$uri"; t1=$(now)
    writes+=("$(mibps "$t0" "$t1")")
    # The same without the flush: what the server itself costs.
    sync
    t0=$(now); nbdcopy --connections="$CONNS" --requests=16 "$raw" "$uri"; t1=$(now)
    cached+=("$(mibps "$t0" "$t1")")
    sync
  done
  R[$s,seqread]=$(median "${reads[@]}")
  R[$s,seqwrite]=$(median "${writes[@]}")
  R[$s,seqwritecached]=$(median "${cached[@]}")
  # qemu-img bench: 4 KiB sequential reads, queue depth 32, one connection.
  out=$(qemu-img bench -f raw -c 100000 -d 32 -s 4096 "$uri")
  R[$s,qbench]=$(awk '/Run completed in/ { printf "%d", 100000 / $4 }' <<<"$out")
  for rw in randread randwrite; do
    sync
    # Terse format v3, one line per group: field 8 is read IOPS, 49 write IOPS.
    out=$(fio --name=b --ioengine=nbd --uri="$uri" --rw=$rw --bs=4k --iodepth=32 --numjobs="$CONNS" \
      --size="${SIZE_MIB}M" --runtime="$RUNTIME" --time_based --group_reporting \
      --output-format=terse --terse-version=3 2>/dev/null)
    R[$s,$rw]=$(awk -F';' '$1 == "3" { printf "%d", $8 + $49 }' <<<"$out")
  done
  stop_server
}

for s in ours qemu nbdkit; do
  echo "bench-nbd: measuring $s"
  measure "$s"
done
qemu-img check -q -f parallels "$img"

printf '\n%-34s %12s %12s %12s %10s %10s\n' "test (${SIZE_MIB} MiB, ${CONNS} conns)" ours qemu-nbd nbdkit-raw ours/qemu ours/nbdkit
for m in seqread:"seq read nbdcopy MiB/s" seqwrite:"seq write+flush nbdcopy MiB/s" \
         seqwritecached:"seq write, no flush, MiB/s" qbench:"seq 4K read qemu-img bench IOPS" \
         randread:"rand 4K read fio IOPS" randwrite:"rand 4K write fio IOPS"; do
  k=${m%%:*}; label=${m#*:}
  o=${R[ours,$k]} q=${R[qemu,$k]} n=${R[nbdkit,$k]}
  printf '%-34s %12s %12s %12s %10s %10s\n' "$label" "$o" "$q" "$n" \
    "$(ratio "$o" "$q")" "$(ratio "$o" "$n")"
done
