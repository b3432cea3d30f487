#!/usr/bin/env bash
# Create .venv and install fastardiff with everything the tests need. Idempotent: re-runs are quick.
# torch is pinned to the CPU wheel first (and triton to the release the GPU machines carry) so that no dependency
# pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.fastardiff-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing torch==2.13.0 (CPU) and fastardiff[dev] into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" "triton==3.6.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
