"""Export targets: the registry, the options every target reads, and helpers they share.

A target is a function  build_X(ckpt: DriftARCheckpoint, work_dir: Path, opts: ExportOptions) -> TargetResult
that writes one engine file per engine (draft_step, target_verify, decoder) into `work_dir` (a temp dir the
orchestrator renames into place), checks each against the PyTorch reference (exporter/parity.py) and fills an
EngineEntry (file, sha256, inputs, outputs, profile, parity). Targets are imported lazily by name, so the
`onnx` target never needs tensorrt and the `trt` target slots in beside the others.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastardiff.errors import EngineError, FastardiffError, MissingDependencyError
from fastardiff.recipes.checkpoint import DriftARCheckpoint
from fastardiff.recipes.config import DriftARConfig
from fastardiff.runtime.manifest import ENGINE_NAMES, EngineEntry, sha256_file

from .engine_modules import (ENGINE_IO, ROLLOUT_GAMMA, ShapeProfile, example_inputs, make_engine_modules,
                             shape_profiles)
from .head_engines import (HEAD_ENGINES, fast_ardiff_modules, head_dynamic_shapes, head_example_inputs, head_profile,
                           head_steps)

log = logging.getLogger("fastardiff.export")

TARGETS: dict[str, str] = {
    "onnx": "fastardiff.exporter.onnx_target:build_onnx",
    "aoti": "fastardiff.exporter.aoti_target:build_aoti",
    "trt": "fastardiff.exporter.trt_target:build_trt",
}
# Libraries whose versions make an engine (part of the engine-cache key and of the manifest).
TARGET_LIBRARIES: dict[str, tuple[str, ...]] = {
    "onnx": ("torch", "onnx", "onnxscript", "onnxruntime"),
    "aoti": ("torch", "triton"),
    "trt": ("torch", "onnx", "onnxscript", "tensorrt", "tensorrt_rtx_cu12", "tensorrt_rtx_cu13"),
}
# Optional python packages each target imports, and the pyproject extra that installs them.
TARGET_DEPENDENCIES: dict[str, tuple[tuple[str, str], ...]] = {
    "onnx": (("onnx", "export"), ("onnxscript", "export"), ("onnxruntime", "onnx")),
    "aoti": (),
    # tensorrt is checked by the trt target itself: `--onnx-only` must work without it
    "trt": (("onnx", "export"), ("onnxscript", "export")),
}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportOptions:
    target: str
    precision: str = "fp32"
    device: str = "cpu"
    max_batch: int = 8
    gamma: int = 4
    atol: float = 1e-4
    rtol: float = 1e-3
    force: bool = False
    onnx_only: bool = False       # trt: stop after the ONNX graph (with plugin nodes) is written
    draft: bool = True            # False: no draft_step / draft_rollout engines (the engines serve --draft jacobi)
    kv_update: str = "auto"       # "in-place": the onnx / aoti AR engines write the KV cache (exporter/onnx_passes.py,
                                  # engine_modules.CacheUpdateInPlace); "auto": the target's KV_UPDATE_DEFAULT
    trt_library: str = "auto"     # trt: tensorrt_rtx | tensorrt | auto (runtime/trt_library.py resolve_library)
    compute_capabilities: tuple = ()   # trt with tensorrt_rtx: the GPUs built for ("8.6", ...); () = its default
    trt_plugin: str = ""          # trt with tensorrt_rtx: sha256 of the C++ plugin library embedded ("" = none built)


@dataclass
class TargetResult:
    backend: str                  # runtime backend registry key written to the manifest
    engines: dict[str, EngineEntry]
    library_versions: dict
    gpu: dict = field(default_factory=dict)
    plugin: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)   # merged into manifest.export


def check_dependencies(target: str) -> None:
    """Raise MissingDependencyError naming the extra when a package the target needs is not installed."""
    for package, extra in TARGET_DEPENDENCIES.get(target, ()):
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(package, extra, f"the '{target}' export target")


def get_target(name: str) -> Callable[[DriftARCheckpoint, Path, ExportOptions], TargetResult]:
    if name not in TARGETS:
        raise FastardiffError(f"unknown export target '{name}'; choose one of: {', '.join(sorted(TARGETS))}")
    check_dependencies(name)
    module_name, attr = TARGETS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise FastardiffError(f"export target '{name}' is not available in this fastardiff build "
                                  f"(module {module_name} is missing)") from None
        raise MissingDependencyError(err.name or "?", _extra_of(err.name), f"the '{name}' export target") from None
    return getattr(module, attr)


def _extra_of(package: str | None) -> str:
    for deps in TARGET_DEPENDENCIES.values():
        for p, extra in deps:
            if p == package:
                return extra
    return "export"


def library_versions(names) -> dict:
    """Installed versions from package metadata (no imports: cheap enough for the cache check)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


KV_UPDATES = ("auto", "host", "in-place")
# `--kv-update auto` per target: where the in-place form measured faster (this project's CPU, whole images, ONNX
# Runtime: the same or faster at batch 1, up to 1.4x at batch 8; AOTInductor: slower at batch 8, inductor copying
# the buffer around its scatter; TensorRT: in place where its ONNX parser takes TensorScatter, 10.15 and later,
# turning it into an IKVCacheUpdateLayer whose output aliases the cache input: no cache copy on the GPU)
KV_UPDATE_DEFAULT = {"onnx": "in-place", "aoti": "host", "trt": "in-place"}
TRT_IN_PLACE_VERSION = (10, 15)


def trt_takes_in_place(version: str | None) -> bool:
    """Whether TensorRT `version` parses the in-place engines' TensorScatter (None: no TensorRT here, an
    --onnx-only export: the graphs are for a current TensorRT)."""
    if version is None:
        return True
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    return tuple(parts) >= TRT_IN_PLACE_VERSION


def installed_trt_version() -> str | None:
    try:
        import tensorrt
    except Exception:  # absent, or the registry's download stub that fails on import: no usable TensorRT
        return None
    return getattr(tensorrt, "__version__", None)


def resolve_trt_options(opts: ExportOptions) -> ExportOptions:
    """trt builds: `--trt-library auto` replaced by the library that builds, and its compute capabilities (what
    the engine cache key records, with the library's version among the TARGET_LIBRARIES)."""
    if opts.target != "trt" or opts.onnx_only:
        return opts
    from fastardiff.runtime import trt_library

    from .trt_target import plugin_library_path

    library = trt_library.resolve_library(opts.trt_library)
    if not library.builds_without_gpu:
        return dataclasses.replace(opts, trt_library=library.key, compute_capabilities=())
    plugin = plugin_library_path()   # embedded where built: a rebuilt plugin is a different engine
    return dataclasses.replace(opts, trt_library=library.key,
                               compute_capabilities=trt_library.parse_compute_capabilities(opts.compute_capabilities),
                               trt_plugin=sha256_file(plugin) if plugin.is_file() else "")


def resolve_options(opts: ExportOptions) -> ExportOptions:
    """`opts` with `--kv-update auto` replaced by the target's choice and the TensorRT library resolved (what the
    engine cache key records)."""
    opts = resolve_trt_options(opts)
    if opts.kv_update != "auto":
        return opts
    choice = KV_UPDATE_DEFAULT.get(opts.target, "host")
    if (opts.target == "trt" and not opts.onnx_only and opts.trt_library == "tensorrt"
            and not trt_takes_in_place(installed_trt_version())):
        choice = "host"
    if opts.precision != "fp32":
        choice = "host"      # the in-place graphs update the fp32 interface buffers; a cast graph would update a copy
    return dataclasses.replace(opts, kv_update=choice)


def check_options(cfg: DriftARConfig, opts: ExportOptions) -> None:
    if opts.precision not in PRECISIONS:
        raise FastardiffError(f"unknown precision '{opts.precision}'; choose one of {', '.join(PRECISIONS)}")
    if opts.device not in ("cpu", "cuda"):
        raise FastardiffError(f"unknown device '{opts.device}'; choose cpu or cuda")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise FastardiffError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if not 1 <= opts.max_batch <= 8:
        raise FastardiffError(f"--batch {opts.max_batch} is out of range; choose 1..8")
    if not 1 <= opts.gamma < cfg.seq_len:
        raise FastardiffError(f"--gamma {opts.gamma} is out of range; choose 1..{cfg.seq_len - 1}")
    if opts.atol < 0 or opts.rtol < 0:
        raise FastardiffError("--atol and --rtol must be >= 0")
    if opts.kv_update not in KV_UPDATES:
        raise FastardiffError(f"unknown --kv-update '{opts.kv_update}'; choose one of {', '.join(KV_UPDATES)}")
    if opts.kv_update == "in-place" and opts.target not in ("onnx", "aoti", "trt"):
        raise FastardiffError(f"--kv-update in-place is built for --target onnx, aoti and trt; --target "
                              f"{opts.target} keeps --kv-update host")
    if opts.kv_update == "in-place" and opts.target == "trt" and opts.precision != "fp32":
        raise FastardiffError(f"--kv-update in-place with --precision {opts.precision} is not built for --target trt "
                              "(the KV-cache-update layers would write a cast copy of the runtime's fp32 cache, not "
                              "the cache itself); use --kv-update host (the default at this precision) or fp32")
    if (opts.kv_update == "in-place" and opts.target == "trt" and not opts.onnx_only
            and opts.trt_library == "tensorrt"):   # TensorRT-RTX takes TensorScatter in every release
        version = installed_trt_version()
        if not trt_takes_in_place(version):
            raise FastardiffError(f"--kv-update in-place needs TensorRT {'.'.join(map(str, TRT_IN_PLACE_VERSION))} "
                                  f"or later (its ONNX parser turns TensorScatter into an IKVCacheUpdateLayer); "
                                  f"this is TensorRT {version}: upgrade it, or export with --kv-update host")


def engine_layers(ckpt: DriftARCheckpoint, name: str) -> int:
    """Number of KV-cache layers an engine takes (0 for the decoder)."""
    if name in ROLLOUT_GAMMA:
        return ckpt.draft.num_layers
    if name == "draft_step":
        return ckpt.draft.num_layers
    return ckpt.target.num_layers if name in ("target_verify", "target_jacobi") else 0


class CastWrapper(nn.Module):
    """Runs an engine module in fp16/bf16 while keeping the engine's interface fp32 (the runtime owns fp32
    buffers): float inputs are cast down, float outputs cast back up."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def run(self, *inputs):
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        out = self.module(*cast)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.float() if o.is_floating_point() else o for o in out)


class ARCastWrapper(CastWrapper):
    def forward(self, tokens, lengths, k_cache, v_cache, cond):  # named inputs: torch.export maps Dims by name
        return self.run(tokens, lengths, k_cache, v_cache, cond)


class RolloutCastWrapper(CastWrapper):
    def forward(self, tokens, lengths, k_cache, v_cache, cond, noise, threshold, max_drafts, temperature, cfg_scale):
        return self.run(tokens, lengths, k_cache, v_cache, cond, noise, threshold, max_drafts, temperature, cfg_scale)


class JacobiCastWrapper(CastWrapper):
    def forward(self, tokens, lengths, k_cache, v_cache, cond, guess_mean, guess_sigma, num_guesses, coins, noise,
                residual_noise, residual_coins, temperature, cfg_scale, coupling):
        return self.run(tokens, lengths, k_cache, v_cache, cond, guess_mean, guess_sigma, num_guesses, coins, noise,
                        residual_noise, residual_coins, temperature, cfg_scale, coupling)


class HeadCastWrapper(CastWrapper):
    def forward(self, z, traj_noise, temperature):
        return self.run(z, traj_noise, temperature)


class DecoderCastWrapper(CastWrapper):
    def forward(self, tokens, entropy, cond):
        return self.run(tokens, entropy, cond)[0]


# One export adapter per model family: checkpoint -> {engine name: torch module with the engine contract}.
# gammas: the draft_rollout lengths to add (1..--gamma).
FAMILY_ADAPTERS: dict[str, Callable[..., dict[str, nn.Module]]] = {
    "drift-ar": lambda ckpt, gammas=(): make_engine_modules(
        ckpt.target, ckpt.draft, ckpt.decoder, ckpt.config.sigma_params(ckpt.calibration.e_max), gammas),
    "fast-ardiff": fast_ardiff_modules,
    # models trained elsewhere (exporter/foreign): their adapter's target_verify and the patch decoder
    "foreign-gaussian": lambda ckpt, gammas=(): __import__("fastardiff.exporter.foreign.engines",
                                                           fromlist=["foreign_modules"]).foreign_modules(ckpt, gammas),
}


def engine_modules(ckpt: DriftARCheckpoint, opts: ExportOptions) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(modules to export, fp32 reference modules); the exported ones are cast to the precision and device."""
    import copy

    family = ckpt.config.family
    if family not in FAMILY_ADAPTERS:
        raise FastardiffError(f"no export adapter for model family '{family}'; known: {', '.join(FAMILY_ADAPTERS)}")
    reference = FAMILY_ADAPTERS[family](ckpt, range(1, opts.gamma + 1) if opts.draft else ())
    if not opts.draft:
        reference = {name: m for name, m in reference.items()
                     if name != "draft_step" and name not in ROLLOUT_GAMMA}
    exported = {}
    for name, module in reference.items():
        m = copy.deepcopy(module).to(opts.device)
        if opts.precision != "fp32":
            wrapper = (DecoderCastWrapper if name == "decoder" else JacobiCastWrapper if name == "target_jacobi"
                       else RolloutCastWrapper if name in ROLLOUT_GAMMA else HeadCastWrapper if name in HEAD_ENGINES
                       else ARCastWrapper)
            m = wrapper(m, PRECISIONS[opts.precision])
        exported[name] = m.eval()
    return exported, reference


def set_attention_impl(module: nn.Module, impl: str) -> nn.Module:
    """Switch every AR transformer inside `module` to entropy-attention implementation `impl` (by name)."""
    from fastardiff.recipes.models import ARTransformer

    for sub in module.modules():
        if isinstance(sub, ARTransformer):
            sub.attention_impl = impl
    return module


def trace_inputs(cfg: DriftARConfig, name: str, layers: int, profile: ShapeProfile, device: str = "cpu"):
    """Example inputs for tracing: sizes inside the profile and never 0 or 1 on a dynamic axis (torch.export
    specialises 0/1-sized dimensions)."""
    batch = min(max(2, profile.batch[1]), profile.batch[2]) if profile.batch[2] >= 2 else profile.batch[2]
    k = min(max(2, profile.new_tokens[1]), profile.new_tokens[2])
    cache = min(max(2, profile.cache[1]), profile.cache[2])
    if name in HEAD_ENGINES:
        return tuple(x.to(device) for x in head_example_inputs(cfg, name, batch, seed=1234))
    if name in ROLLOUT_GAMMA:  # 4 rows = 2 samples x [cond; uncond] (guidance traced), no axis of size 1
        from .engine_modules import rollout_example_inputs

        rows = 4 if profile.batch[2] >= 4 else profile.batch[2]
        samples = 2 if rows == 4 else rows
        g = torch.Generator().manual_seed(1234)
        return tuple(x.to(device) for x in rollout_example_inputs(cfg, ROLLOUT_GAMMA[name], layers, rows, 2,
                                                                  profile.cache[2], g, samples))
    if name == "target_jacobi":  # 4 rows = 2 samples x [cond; uncond]; K = 3 fed, G = 2, W = 4, C = 5: distinct
        from .engine_modules import jacobi_example_inputs

        rows = 4 if profile.batch[2] >= 4 else profile.batch[2]
        g = torch.Generator().manual_seed(1234)
        return tuple(x.to(device) for x in jacobi_example_inputs(cfg, layers, rows, 3, cache, g,
                                                                 2 if rows == 4 else rows, window=3, proposals=5))
    if name != "decoder":
        k = min(k, cfg.seq_len - 2)
    return tuple(x.to(device) for x in example_inputs(cfg, name, layers, batch, k, cache, seed=1234))


def dynamic_shapes(name: str, profile: ShapeProfile, derived_dims: bool = True) -> dict:
    """torch.export Dim ranges for the engine inputs (same names as ENGINE_IO). target_jacobi's guess axis is
    K - 1: a derived Dim for torch.export (AOTInductor); `derived_dims=False` gives it a Dim of its own, for
    torch.onnx (2.13 fails on derived Dims with KeyError 'min' and infers the relation itself)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=profile.batch[0], max=profile.batch[2]) if profile.batch[2] > 1 else None
    if name == "decoder":
        return {"tokens": {0: batch}, "entropy": {0: batch}, "cond": {0: batch}}
    if name in HEAD_ENGINES:
        return head_dynamic_shapes(profile)
    k = Dim("K", min=profile.new_tokens[0], max=profile.new_tokens[2])
    if name in ROLLOUT_GAMMA:  # cache rows (B or 2B with guidance) and samples B are separate axes; S is static
        samples = Dim("samples", min=1, max=profile.batch[2]) if profile.batch[2] > 1 else None
        return {"tokens": {0: batch, 1: k}, "lengths": {0: batch}, "k_cache": {1: batch}, "v_cache": {1: batch},
                "cond": {0: batch}, "noise": {0: samples}, "threshold": {0: samples}, "max_drafts": {0: samples},
                "temperature": None, "cfg_scale": None}
    s = Dim("cache", min=profile.cache[0], max=profile.cache[2])
    if name == "target_jacobi":
        samples = Dim("samples", min=1, max=profile.batch[2]) if profile.batch[2] > 1 else None
        guesses = k - 1 if derived_dims else Dim("guesses", min=1, max=profile.new_tokens[2] - 1)  # feed: [x, guesses]
        slots = Dim("slots", min=2, max=profile.new_tokens[2] + 1)
        proposals = Dim("proposals", min=2, max=256)
        per_sample = {"guess_mean": {0: samples, 1: guesses},
                      "guess_sigma": {0: samples, 1: guesses}, "num_guesses": {0: samples},
                      "coins": {0: samples, 1: guesses}, "noise": {0: samples, 1: slots},
                      "residual_noise": {0: samples, 1: slots, 2: proposals},
                      "residual_coins": {0: samples, 1: slots, 2: proposals},
                      "temperature": None, "cfg_scale": None, "coupling": None}
        return {"tokens": {0: batch, 1: k}, "lengths": {0: batch}, "k_cache": {1: batch, 3: s},
                "v_cache": {1: batch, 3: s}, "cond": {0: batch}, **per_sample}
    return {"tokens": {0: batch, 1: k}, "lengths": {0: batch}, "k_cache": {1: batch, 3: s},
            "v_cache": {1: batch, 3: s}, "cond": {0: batch}}


def profile_dict(profile: ShapeProfile) -> dict:
    return {"batch": list(profile.batch), "K": list(profile.new_tokens), "cache": list(profile.cache)}


def build_all_engines(ckpt: DriftARCheckpoint, work_dir: Path, opts: ExportOptions,
                      build_one: Callable[[str, nn.Module, nn.Module, ShapeProfile], tuple],
                      ) -> dict[str, EngineEntry]:
    """Loop the engines with one progress line each: build_one(name, module, reference, profile) writes the
    engine file into work_dir and returns (file name relative to work_dir, parity report[, the file's own
    EngineEntry fields where they are not the contract's: {"inputs", "outputs", "cache_layers", "profile"}, e.g.
    the in-place engines with per-layer caches])."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    check_options(ckpt.config, opts)
    modules, references = engine_modules(ckpt, opts)
    profiles = shape_profiles(ckpt.config, opts.max_batch, opts.gamma)
    profiles.update({n: head_profile(ckpt.config, n, opts.max_batch, opts.gamma) for n in modules if n in HEAD_ENGINES})
    entries = {}
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        bar = tqdm(list(modules), desc=f"export {opts.target}", unit="engine", leave=False,
                   disable=None if log.isEnabledFor(logging.INFO) else True)
        for name in bar:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            try:
                file, parity, *more = build_one(name, modules[name], references[name], profiles[name])
            except FastardiffError:
                raise
            except Exception as err:  # exporter/compiler internals: one clear line, the trace under --verbose
                log.debug("export of %s failed", name, exc_info=True)
                root = err
                while root.__cause__ is not None:
                    root = root.__cause__
                first = (str(root).strip().splitlines() or [""])[0][:200]
                raise EngineError(f"exporting engine '{name}' to target '{opts.target}' ({opts.precision}, "
                                  f"{opts.device}) failed: {type(root).__name__}: {first} (rerun with --verbose "
                                  "for the full trace)") from None
            inputs, outputs = ENGINE_IO[name]
            io = more[0] if more else {}
            entries[name] = EngineEntry(file=file, sha256=sha256_file(work_dir / file),
                                        inputs=list(io.get("inputs", inputs)), outputs=list(io.get("outputs", outputs)),
                                        cache_layers=io.get("cache_layers", 0),
                                        profile=profile_dict(io.get("profile", profiles[name])), parity=parity,
                                        kind="draft_rollout" if name in ROLLOUT_GAMMA
                                        else "head" if name in HEAD_ENGINES else name,
                                        gamma=ROLLOUT_GAMMA.get(name, 0),
                                        steps=head_steps(ckpt.config, name) if name in HEAD_ENGINES else 0,
                                        residual=getattr(references[name], "residual", ""))
            worst = max((v["max_abs"] for v in parity.get("outputs", {}).values()), default=float("nan"))
            log.info("  %-13s %-20s %6.1f s   parity max abs %.2e", name, file, time.perf_counter() - start, worst)
    return entries
