#!/usr/bin/env bash
# The driver's full lifecycle on a local storage root. The CSI driver does not
# exist yet (see the open issues), so this shows what ploopctl already does.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "make demo: the CSI driver is not built yet; see 'issues'."
