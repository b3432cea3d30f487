#!/usr/bin/env bash
# README command 2: install (if needed) and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One worker per core (2 on CI); --dist loadfile keeps each file on one worker with its module/session fixtures
# (the engine exports), so no engine is built twice. (--dist loadgroup did not group at all with pytest-xdist 3.8
# here, not even module-level xdist_group marks: measured.)
# FASTARDIFF_TEST_WORKERS=0 runs in this process.
workers=${FASTARDIFF_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}
[ "$workers" -gt 4 ] && workers=4
dist=()
[ "$workers" -gt 0 ] && dist=(-n "$workers" --dist loadfile)
exec .venv/bin/python -m pytest -q -ra --durations=15 "${dist[@]}" "$@"
