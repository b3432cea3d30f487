#!/usr/bin/env bash
# One GPU check for fastardiff: on a fresh CUDA machine (torch + Triton, no network) it runs, each step under its
# own timeout and all of them inside one budget (GPU_CHECK_BUDGET, default 450 s: under 8 minutes with the
# kill margins), and writes JSON, logs and plots under $OUT:
#
#   env                    python / torch / Triton / GPU / packages                      env.json
#   pytest-gpu             pytest -m gpu over tests/                                     pytest-gpu.xml
#   kernels                fastardiff bench kernels: fused entropy attention vs SDPA     kernels.json
#                          vs the unfused reference
#   pipeline-tiny-mnist    bench pipeline --device cuda: AOTInductor engines + torch,   pipeline-tiny-mnist.json/.png
#                          batch 1/8/64 (exported engines stop at batch 8, see its "skipped")
#   device-cache           KV caches kept on the GPU vs host caches copied every call,   device-cache.json
#                          and CUDA graph replays (torch on CUDA, shipped model, batch 1/8, interleaved)
#   pipeline-mar-*-torch   random-weight mar-b-like / mar-l-like on torch (CUDA),        pipeline-mar-*-torch.json
#                          batch 1/8/64
#   pipeline-mar-*-aoti    the same on AOTInductor engines (CUDA), batch 1/8, in the     pipeline-mar-*-aoti.json
#                          time left (compiling a 24/32-layer target takes minutes)
#   trt-rtx-export         TensorRT-RTX engines built ahead of time for this GPU's       logs/trt-rtx-export.log
#                          compute capability (skipped without tensorrt_rtx)
#   trt-rtx-run / -again   those engines deserialised and run (validity check, JIT,       trt-rtx-run.png
#                          runtime cache written; the second run reads the cache)
#   ort-trt-rtx-ep         the onnx engines on ONNX Runtime's TensorRT-RTX plugin EP     ort-trt-rtx-ep.png
#                          (skipped without onnxruntime-ep-nv-tensorrt-rtx)
#   report                 measured copy bandwidth, target_verify step time / weight-    report.json, *.png
#                          bandwidth floor per model, backend and batch; the plots
#
# A failing or timed-out step is recorded and the next one runs; summary.json (rewritten after every step) lists
# each step's command, status (ok / failed / timeout / skipped), exit code, seconds and log. Every figure in these
# files is measured by this run on this machine; a step that did not run leaves no figure.
#
#   OUT=/tmp/gpu-check benchmarks/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/gpu-check benchmarks/gpu_check.sh --dry-run  # any machine: the plumbing on CPU, no GPU figure
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), GPU_CHECK_BUDGET (seconds),
# GPU_CHECK_TIMEOUT_<STEP> (one step's cap, e.g. GPU_CHECK_TIMEOUT_PYTEST_GPU=60), GPU_CHECK_DRY_PIPELINE=1 (the
# dry run also times a tiny random-weight pipeline on CPU: slow, minutes on a loaded machine).
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
if [[ -z "${OUT:-}" ]]; then
  echo "error: set OUT to the directory for the results, e.g. OUT=/tmp/gpu-check $0" >&2
  exit 2
fi
BUDGET=${GPU_CHECK_BUDGET:-450}
RESERVE=40    # seconds kept for the report step
KILL_AFTER=5  # a step that ignores SIGTERM is killed this much later
MIN_STEP=10   # a step with less time than this left is skipped, not started
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi
mkdir -p "$OUT/logs" || { echo "error: cannot create OUT='$OUT'" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastardiff-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT/summary.json"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# fastardiff importable without installing it (no network): the package layout of pyproject.toml, by symlinks
if ! "$PYTHON" -c "import fastardiff.exporter, fastardiff.runtime, fastardiff.recipes" >/dev/null 2>&1; then
  mkdir -p "$WORK/pkg/fastardiff"
  cp "$ROOT"/fastardiff/*.py "$WORK/pkg/fastardiff/"
  for sub in exporter runtime recipes; do ln -s "$ROOT/$sub" "$WORK/pkg/fastardiff/$sub"; done
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------------------------------------- bookkeeping

cat > "$WORK/record.py" <<'PY'
"""record.py SUMMARY start|step|finish ...: keep summary.json current (atomic rewrite)."""
import json, os, sys, time
path, what = sys.argv[1], sys.argv[2]
data = json.load(open(path)) if os.path.exists(path) and what != "start" else {}
if what == "start":
    data = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": sys.argv[3] == "1",
            "budget_seconds": int(sys.argv[4]), "python": sys.argv[5], "steps": []}
elif what == "step":
    name, status, rc, seconds, limit, log, note, command = sys.argv[3:11]
    data["steps"].append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(seconds),
                          "timeout_seconds": int(limit), "log": log or None, "note": note or None,
                          "command": command})
else:
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    data["total_seconds"] = int(sys.argv[3])
    data["outputs"] = sorted(p for p in os.listdir(os.path.dirname(path)) if p != "logs")
    data["ran"] = [s["name"] for s in data["steps"] if s["status"] == "ok"]
    data["not_ok"] = {s["name"]: s["status"] for s in data["steps"] if s["status"] != "ok"}
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
PY
record() { "$PYTHON" "$WORK/record.py" "$SUMMARY" "$@"; }

# run_step NAME CAP NOTE CMD...: run CMD with a timeout of min(CAP, what the budget leaves), log to logs/NAME.log
run_step() {
  local name=$1 cap=$2 note=$3
  shift 3
  local var="GPU_CHECK_TIMEOUT_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  cap=${!var:-$cap}
  local left=$((BUDGET - SECONDS - KILL_AFTER))
  [[ "$name" != report ]] && left=$((left - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < MIN_STEP && cap >= MIN_STEP)); then
    echo "[gpu-check] $name: skipped (${left}s of the budget left)"
    record step "$name" skipped "" 0 "$limit" "" "out of time budget (${left}s left)" "$*"
    return 0
  fi
  local log="$OUT/logs/$name.log" start=$SECONDS rc status
  echo "[gpu-check] $name (timeout ${limit}s): $*"
  timeout --kill-after="$KILL_AFTER" "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "[gpu-check] $name: $status (rc $rc, $((SECONDS - start))s)"
  record step "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" "logs/$name.log" "$note" "$*"
  return 0
}

skip_step() {  # skip_step NAME WHY
  echo "[gpu-check] $1: skipped ($2)"
  record step "$1" skipped "" 0 0 "" "$2" ""
}

# ---------------------------------------------------------------------------------------------- helpers in python

cat > "$WORK/env.py" <<'PY'
import importlib.util, json, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform(),
        "packages": {p: importlib.util.find_spec(p) is not None for p in
                     ("torch", "triton", "pytest", "matplotlib", "onnx", "onnxruntime", "polygraphy", "click",
                      "pydantic", "tqdm")}}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                       "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
except ImportError:
    info.update(torch=None, cuda=False)
if info["packages"]["triton"]:
    import triton
    info["triton"] = triton.__version__
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
PY

cat > "$WORK/bench.py" <<'PY'
"""`fastardiff bench ARGS` through the bench group itself: the top-level CLI's dependency gate asks for ONNX
Runtime even when only CUDA backends are timed, and a fresh GPU machine may not have it."""
import logging, sys
import click
from fastardiff.errors import FastardiffError
from fastardiff.exporter.bench_cli import bench_command
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
try:
    bench_command.main(sys.argv[1:], prog_name="fastardiff bench", standalone_mode=False)
except click.ClickException as err:
    err.show()
    sys.exit(err.exit_code)
except FastardiffError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
PY

cat > "$WORK/report.py" <<'PY'
"""report.py OUT DEVICE: measured copy bandwidth, target_verify step time / weight-bandwidth floor, plots.
Reads only what this run wrote under OUT; writes report.json (and PNGs when matplotlib is installed)."""
import glob, json, os, sys, time
import xml.etree.ElementTree as ET

out, device = sys.argv[1], sys.argv[2]
report = {"device": device, "figures": "measured by this run on this machine" + (
    "; dry run on CPU: CPU figures, no GPU figure" if device == "cpu" else "")}
import torch

def copy_bandwidth(nbytes, reps):
    """Bytes read + written per second by a device copy of nbytes (an achievable rate, below the spec sheet's)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            y.copy_(x)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            y.copy_(x)
        seconds = time.perf_counter() - t0
    return 2 * nbytes * reps / seconds

nbytes = (1 << 30) if device == "cuda" else (1 << 26)
bw = copy_bandwidth(nbytes, 50 if device == "cuda" else 5)
report["copy_bandwidth"] = {"bytes_per_second": bw, "buffer_bytes": nbytes, "what": "y.copy_(x), read + write"}

from fastardiff.recipes.config import get_config
from fastardiff.recipes.models import ARTransformer

def target_weight_bytes(name):
    cfg = get_config(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        target = ARTransformer(cfg, cfg.target_layers)
    return sum(p.numel() * 4 for p in target.parameters())  # the engines run fp32 weights

floors = []
for path in sorted(glob.glob(os.path.join(out, "pipeline-*.json"))):
    data = json.load(open(path))
    meta = data.get("meta", {})
    if not meta.get("config"):
        continue
    weights = target_weight_bytes(meta["config"])
    for row in data.get("rows", []):
        if row.get("mode") != "target":
            continue
        step_ms = row["per call ms"]["target step"]
        floor_ms = 1e3 * weights / bw
        floors.append({"source": os.path.basename(path), "config": meta["config"],
                       "random_weights": meta.get("random_weights"), "backend": row["backend"],
                       "batch": row["batch"], "target_step_ms": step_ms, "target_weight_bytes": weights,
                       "floor_ms": floor_ms, "ratio": step_ms / floor_ms})
report["target_verify_vs_weight_floor"] = floors
report["floor_definition"] = ("floor = target weight bytes (fp32) / measured copy bandwidth: the time to read "
                              "the weights once; target step = per-call target_verify time seen by the runtime "
                              "in the target-only rows (host transfers included)")

junit = os.path.join(out, "pytest-gpu.xml")
if os.path.exists(junit):
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    report["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}

plots = []
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    report["plots"] = "matplotlib is not installed: no plots"
else:
    kernels = os.path.join(out, "kernels.json")
    if os.path.exists(kernels):
        rows = json.load(open(kernels))["rows"]
        ks = sorted({r["K"] for r in rows})
        fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for impl, style in (("fused", "o-"), ("sdpa", "s--"), ("reference", "x:")):
                for b in sorted({r["batch"] for r in rows}):
                    pts = sorted((r["N"], r[f"{impl}_ms"]) for r in rows
                                 if r["K"] == k and r["batch"] == b and r.get(f"{impl}_ms"))
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{impl} B={b}")
            ax.set(xscale="log", yscale="log", xlabel="keys N", ylabel="ms per call", title=f"K={k}")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "kernels.png"), dpi=110)
        plots.append("kernels.png")
    if floors:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(floors)), 4))
        labels = [f"{f['config']}\n{f['backend']} B={f['batch']}" for f in floors]
        ax.bar(range(len(floors)), [f["ratio"] for f in floors])
        ax.set_xticks(range(len(floors)), labels, fontsize=6, rotation=90)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("target step / weight-bandwidth floor")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "bandwidth_floor.png"), dpi=110)
        plots.append("bandwidth_floor.png")
    report["plots"] = plots
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report, indent=2))
PY

# ---------------------------------------------------------------------------------------------- the steps

record start "$DRY_RUN" "$BUDGET" "$PYTHON"
run_step env 60 "" "$PYTHON" "$WORK/env.py" "$OUT/env.json"
HAVE_CUDA=$("$PYTHON" -c "import json,sys; print(int(json.load(open(sys.argv[1])).get('cuda', False)))" \
            "$OUT/env.json" 2>/dev/null || echo 0)
if [[ "$DRY_RUN" == 1 ]]; then
  DEVICE=cpu
  echo "[gpu-check] dry run: CPU stand-ins for the GPU steps; no GPU figure is produced"
elif [[ "$HAVE_CUDA" != 1 ]]; then
  echo "error: torch sees no CUDA GPU here (see $OUT/logs/env.log); run with --dry-run to check the plumbing" >&2
  record finish "$SECONDS"
  exit 2
else
  DEVICE=cuda
fi

PYTEST_TARGETS=("$ROOT/tests")
[[ "$DRY_RUN" == 1 ]] && PYTEST_TARGETS=("$ROOT/tests/test_bench_kernels.py")
run_step pytest-gpu 150 "" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -o addopts= \
  --junitxml="$OUT/pytest-gpu.xml" "${PYTEST_TARGETS[@]}"

# without a GPU this fails with "no CUDA GPU" (the dry run shows that a failed step does not stop the others)
run_step kernels 75 "fused entropy attention vs SDPA vs unfused" \
  "$PYTHON" -m fastardiff bench kernels --json "$OUT/kernels.json"

BENCH=("$PYTHON" "$WORK/bench.py" pipeline --gamma 2 --jacobi none --repeats 2 --early-stop static)
if [[ "$DEVICE" == cuda ]]; then
  run_step pipeline-tiny-mnist 120 "shipped checkpoint, AOTInductor (CUDA) + torch (CUDA)" \
    "${BENCH[@]}" --device cuda --batch 1,8,64 --json "$OUT/pipeline-tiny-mnist.json"
  run_step device-cache 75 "KV caches on the GPU vs host caches copied per call, and CUDA graphs; torch on CUDA" \
    "$PYTHON" "$ROOT/benchmarks/device_cache_bench.py" --device cuda --batch 1,8 --repeats 2 --cuda-graphs \
    --json "$OUT/device-cache.json"
  for model in mar-b-like mar-l-like; do
    run_step "pipeline-$model-torch" 75 "random weights, torch on CUDA" \
      "${BENCH[@]}" --device cuda --config "$model" --no-export --batch 1,8,64 --json "$OUT/pipeline-$model-torch.json"
  done
  for model in mar-b-like mar-l-like; do
    run_step "pipeline-$model-aoti" 150 "random weights, AOTInductor engines compiled for CUDA" \
      "${BENCH[@]}" --device cuda --config "$model" --no-torch --batch 1,8 --json "$OUT/pipeline-$model-aoti.json"
  done
  # TensorRT for RTX: built here for this GPU, then loaded (validity, JIT, runtime cache in $XDG_CACHE_HOME) and run.
  # Its engines carry the C++ plugin only where build/plugin/libfastardiff_trt_plugin.so was built (CMakeLists.txt,
  # TensorRT headers); otherwise FASTARDIFF_TRT_PLUGIN must name it for the run steps.
  if "$PYTHON" -c "import tensorrt_rtx" >/dev/null 2>&1; then
    CC=$("$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
    export XDG_CACHE_HOME="$WORK/cache"
    run_step trt-rtx-export 240 "TensorRT-RTX ahead-of-time build for compute capability $CC" \
      "$PYTHON" -m fastardiff export --target trt --trt-library tensorrt_rtx --compute-capability "$CC" --gamma 2 \
      --out "$WORK/trt-rtx"
    run_step trt-rtx-run 120 "TensorRT-RTX engines run (first load: JIT, runtime cache written)" \
      "$PYTHON" -m fastardiff run --engine "$WORK/trt-rtx" --prompt 3,7 --device cuda --gamma 2 \
      --out "$OUT/trt-rtx-run.png"
    run_step trt-rtx-run-again 90 "second load: the runtime cache of the first is read" \
      "$PYTHON" -m fastardiff run --engine "$WORK/trt-rtx" --prompt 3,7 --device cuda --gamma 2 \
      --out "$OUT/trt-rtx-run-again.png"
  else
    skip_step trt-rtx-export "tensorrt_rtx is not installed (pip install 'fastardiff[trt-rtx]')"
  fi
  if "$PYTHON" -c "import onnxruntime_ep_nv_tensorrt_rtx" >/dev/null 2>&1; then
    run_step ort-trt-rtx-export 240 "onnx engines for ONNX Runtime's TensorRT-RTX EP" \
      "$PYTHON" -m fastardiff export --target onnx --gamma 2 --out "$WORK/onnx"
    run_step ort-trt-rtx-ep 150 "onnx engines on ONNX Runtime's TensorRT-RTX plugin EP (--device cuda)" \
      "$PYTHON" -m fastardiff run --engine "$WORK/onnx" --prompt 3,7 --device cuda --gamma 2 \
      --out "$OUT/ort-trt-rtx-ep.png"
  else
    skip_step ort-trt-rtx-ep "onnxruntime-ep-nv-tensorrt-rtx-cu12 is not installed"
  fi
elif [[ "${GPU_CHECK_DRY_PIPELINE:-0}" == 1 ]]; then
  run_step pipeline-dry-cpu 600 "dry run: random-weight tiny-mnist-small, torch on CPU (CPU figures)" \
    "$PYTHON" "$WORK/bench.py" pipeline --gamma 1 --jacobi none --repeats 1 --device cpu --config tiny-mnist-small \
    --no-export --batch 1 --json "$OUT/pipeline-dry-cpu.json"
else
  skip_step pipeline "dry run: the pipeline benchmarks need CUDA (GPU_CHECK_DRY_PIPELINE=1 times a tiny CPU one)"
fi

run_step report 40 "target_verify step time / weight-bandwidth floor; plots" \
  "$PYTHON" "$WORK/report.py" "$OUT" "$DEVICE"
record finish "$SECONDS"
echo "[gpu-check] done in ${SECONDS}s: $SUMMARY"
