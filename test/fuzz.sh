#!/usr/bin/env bash
# Runs every fuzz target in the module for a short time ($1, default 5s).
# go test accepts one -fuzz target per invocation, so iterate over them.
set -euo pipefail
cd "$(dirname "$0")/.."
t="${1:-5s}"
mapfile -t targets < <({ git ls-files '*_test.go'; git ls-files --others --exclude-standard '*_test.go'; } \
  | sort -u | xargs -r grep -H -E '^func Fuzz[A-Za-z0-9_]*\(' || true)
for line in "${targets[@]}"; do
  file=${line%%:*}
  name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*).*/\1/' <<<"${line#*:}")
  echo "fuzz ./$(dirname "$file") $name ($t)"
  go test -run='^$' -fuzz="^${name}\$" -fuzztime="$t" "./$(dirname "$file")"
done
echo "fuzz targets run: ${#targets[@]}"
