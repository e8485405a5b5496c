#!/usr/bin/env bash
# Compares I/O through a ploop image (pkg/ploop) with the same pattern on a
# raw file, in one run: sequential 1 MiB and random 4 KiB reads and writes,
# through the page cache and with O_DIRECT, over a 256 MiB disk. Each write
# pattern ends with a flush (fsync). raw and ploop run back to back per
# pattern, COUNT times (default 4, alternating which goes first); the
# table shows the best MB/s of each and the ratio ploop/raw (1.00 = as fast
# as raw). BENCHTIME (default 1x) is passed to go test -benchtime.
set -euo pipefail
cd "$(dirname "$0")/../.."
count="${COUNT:-4}"
benchtime="${BENCHTIME:-1x}"
# Separate runs rather than -count, which repeats one sub-benchmark before
# moving on and so would separate raw from ploop in time again.
go test -c -o /dev/null ./pkg/ploop # fail early on build errors
out=
# Runs alternate which of raw and ploop goes first in each pair.
for i in $(seq "$count"); do
  out+=$(PLOOP_BENCH_PLOOP_FIRST=$((i % 2 == 0)) \
    go test -run '^$' -bench '^BenchmarkIO$' -benchtime="$benchtime" -count=1 ./pkg/ploop)$'\n'
done
echo "$out" | grep -E '^(goos|goarch|cpu|Benchmark)'
echo
echo "$out" | awk '
  /^BenchmarkIO\// {
    name = $1; sub(/^BenchmarkIO\//, "", name); sub(/-[0-9]+$/, "", name)
    split(name, p, "/")               # mode / pattern / kind
    mbs = 0
    for (i = 2; i <= NF; i++) if ($(i) == "MB/s") mbs = $(i - 1) + 0
    key = p[1] "/" p[2]
    if (!(key in seen)) { seen[key] = 1; order[++n] = key }
    if (mbs > best[key, p[3]]) best[key, p[3]] = mbs
  }
  END {
    if (n == 0) { print "no benchmark results" > "/dev/stderr"; exit 1 }
    printf "%-30s %12s %12s %10s\n", "pattern (best of runs)", "raw MB/s", "ploop MB/s", "ploop/raw"
    for (i = 1; i <= n; i++) {
      k = order[i]; r = best[k, "raw"]; q = best[k, "ploop"]
      printf "%-30s %12.1f %12.1f %10.2f\n", k, r, q, (r > 0 ? q / r : 0)
    }
  }'
