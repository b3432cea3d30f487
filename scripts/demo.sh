#!/usr/bin/env bash
# README command 1: install (if needed), export the shipped tiny-mnist model to ONNX, run speculative
# decoding on the ONNX engines (CPU), write a PNG grid and the statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/fastardiff-export --target onnx --out engines/tiny-mnist-onnx
.venv/bin/fastardiff-run --engine engines/tiny-mnist-onnx --prompt "0 1 2 3 4 5 6 7 8 9" --num-images 40 \
  --gamma auto --early-stop static --seed 0 --out out/samples.png --stats-json out/stats.json
echo "wrote out/samples.png and out/stats.json"
