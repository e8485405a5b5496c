#!/usr/bin/env bash
# Runs every benchmark script in test/bench (each prints its own ratio table).
set -euo pipefail
cd "$(dirname "$0")"
for s in ./bench-*.sh; do
  [ -e "$s" ] || continue
  echo "== $s"; "$s"
done
