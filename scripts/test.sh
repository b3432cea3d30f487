#!/usr/bin/env bash
# README command 2: install (if needed) and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One worker per core (2 on CI); --dist loadgroup keeps each file's module/session fixtures (the exports) in one
# worker, so no engine is built twice (tests/conftest.py groups by file; the long statistical file is spread).
# FASTARDIFF_TEST_WORKERS=0 runs in this process.
workers=${FASTARDIFF_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}
[ "$workers" -gt 4 ] && workers=4
dist=()
[ "$workers" -gt 0 ] && dist=(-n "$workers" --dist loadgroup)
exec .venv/bin/python -m pytest -q -ra --durations=15 "${dist[@]}" "$@"
