#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One test process per core, at most 4 (pytest-xdist); a file's tests stay in one process,
# which builds the file's tiny models and lowered builds once (tests/conftest.py shares the cores).
workers=$(python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
python -m pytest tests -n "$workers" --dist loadfile "$@"
