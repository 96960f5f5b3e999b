#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest tests "$@"
