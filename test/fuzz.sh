#!/usr/bin/env bash
# Runs every fuzz target in the module for a short time ($1, default 5s).
# go test accepts one -fuzz target per invocation, so iterate over them.
#
# Go before 1.27 has a race in its fuzz coordinator (golang/go#75804): when
# a duration -fuzztime runs out on a loaded machine, it can report the
# bare error "context deadline exceeded" with no failing input. A real
# finding always writes its input to testdata/fuzz/; so such a run is
# retried once, and fails only if it happens again or anything else went
# wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
t="${1:-5s}"
mapfile -t targets < <({ git ls-files '*_test.go'; git ls-files --others --exclude-standard '*_test.go'; } \
  | sort -u | xargs -r grep -H -E '^func Fuzz[A-Za-z0-9_]*\(' || true)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# coordinator_flake: the run failed with the coordinator's bare deadline
# error and nothing else.
coordinator_flake() {
  grep -q '^    context deadline exceeded$' "$log" &&
    ! grep -q -E 'Failing input written to|panic:|^\s+\S+_test\.go:[0-9]+:' "$log"
}
for line in "${targets[@]}"; do
  file=${line%%:*}
  name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*).*/\1/' <<<"${line#*:}")
  for attempt in 1 2; do
    echo "fuzz ./$(dirname "$file") $name ($t)"
    if go test -run='^$' -fuzz="^${name}\$" -fuzztime="$t" "./$(dirname "$file")" 2>&1 | tee "$log"; then
      break
    fi
    if [[ $attempt == 1 ]] && coordinator_flake; then
      echo "fuzz $name: the fuzz coordinator's deadline race (golang/go#75804), no failing input; running it again"
      continue
    fi
    exit 1
  done
done
echo "fuzz targets run: ${#targets[@]}"
