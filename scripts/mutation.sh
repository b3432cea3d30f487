#!/usr/bin/env bash
# Mutation testing (not part of CI): one plausible bug at a time against a fast test selection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/mutation.py "$@"
