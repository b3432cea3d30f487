"""Export orchestration: checkpoint -> engines + manifest.json in an engine directory, with an engine cache.

Cache key = sha256 of (checkpoint file sha256, config hash, calibration, target, export options, library
versions, manifest format). If OUT already holds a manifest with the same key and every engine file matches
its sha256, nothing is rebuilt ("cache hit"). Otherwise the engines are built in a temp dir beside OUT, the
manifest is written there, and the temp dir is renamed onto OUT; an existing OUT is moved aside first and
removed only after the rename succeeded, so a failed export never leaves a half-written engine dir.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from fastardiff.errors import EngineError, FastardiffError
from fastardiff.runtime.manifest import (FORMAT_VERSION, MANIFEST_NAME, Manifest, load_manifest, sha256_file,
                                         verify_engine_files, write_manifest)

from fastardiff.runtime.atomic import created_dirs_removed_on_failure, replace_keeping_backup

from .targets import TARGET_LIBRARIES, ExportOptions, get_target, library_versions, resolve_options

log = logging.getLogger("fastardiff.export")


def cache_key(ckpt_sha256: str, config_hash: str, calibration: dict, opts: ExportOptions, versions: dict,
              gpu: dict | None = None) -> str:
    ident = {k: v for k, v in asdict(opts).items() if k != "force"}
    blob = json.dumps({"checkpoint": ckpt_sha256, "config": config_hash, "calibration": calibration,
                       "options": ident, "libraries": versions, "gpu": gpu or {},
                       "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def engine_code_hash() -> str:
    """sha256 (16 hex) of the sources that define what an engine computes and its contract (the engine modules,
    the models, entropy attention, the target sampling rule): an edit there invalidates cached engines even when
    the package version stays the same."""
    from fastardiff.recipes import entropy_attention, models
    from fastardiff.runtime import distribution

    from . import engine_modules, head_engines, onnx_passes, rollout

    digest = hashlib.sha256()
    for module in (engine_modules, rollout, head_engines, onnx_passes, models, entropy_attention, distribution):
        digest.update(Path(module.__file__).read_bytes())
    recipes = Path(models.__file__).parent
    for name in ("diffusion_head.py", "fast_ardiff.py"):   # the diffusion-head family's sampler and networks
        if (recipes / name).is_file():
            digest.update((recipes / name).read_bytes())
    here = Path(__file__).parent
    # the targets' builders (graph fixes, TensorRT builds, plugin creator) and foreign models' adapters: a change
    # to how an engine is built rebuilds it too
    builders = [*here.glob("*_target.py"), *here.glob("trt_*.py"), *(here / "foreign").glob("*.py")]
    for source in sorted(builders):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _gpu_identity(device: str) -> dict:
    """The GPU the engines are built for ({} on cpu); --device cuda without a CUDA device is a user error."""
    if device != "cuda":
        return {}
    import torch

    if not torch.cuda.is_available():
        raise FastardiffError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def check_output_dir(out: Path) -> None:
    """OUT must be creatable beside its parent, and if it exists be an engine dir (or empty) we may replace.
    Writes nothing: the parent directories are created only when the build starts."""
    from fastardiff.runtime.images import check_destination

    if out.exists() and not out.is_dir():
        raise FastardiffError(f"--out '{out}' exists and is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise FastardiffError(f"--out '{out}' is a non-empty directory without {MANIFEST_NAME}; refusing to "
                              "replace it (choose a new directory or remove it)")
    check_destination(out, "--out", is_dir=True)


def cached_manifest(out: Path, key: str) -> Manifest | None:
    """The manifest in OUT if it was built with `key` and its engine files verify; else None (with the reason)."""
    if not (out / MANIFEST_NAME).exists():
        return None
    try:
        manifest = load_manifest(out)
    except EngineError as err:
        log.info("existing %s is unusable (%s); rebuilding", out / MANIFEST_NAME, err)
        return None
    if manifest.export.get("cache_key") != key:
        log.info("engines in %s were built from a different checkpoint, options or library versions; rebuilding", out)
        return None
    try:
        verify_engine_files(out, manifest)
    except EngineError as err:
        log.info("%s; rebuilding", err)
        return None
    return manifest


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp onto out; an existing out is moved aside first and restored if the rename fails."""
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rmdir(aside)                                   # a free name beside out, for the old engines
    old = replace_keeping_backup(tmp, out, aside)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_engines(ckpt_path: str | Path, out: str | Path, opts: ExportOptions,
                   model: str | None = None, draft_ckpt: str | Path | None = None) -> tuple[Manifest, bool]:
    """Build (or reuse) the engines of `ckpt_path` for `opts.target` in `out`. Returns (manifest, cache_hit).
    model: a foreign model's factory `package.module:function` (exporter/foreign); ckpt_path is then its weights.
    draft_ckpt: a draft made for that model (recipes/foreign_draft.py): its draft_step engine is added."""
    from fastardiff.recipes.checkpoint import load_checkpoint

    out = Path(out)
    if draft_ckpt is not None and model is None:
        raise FastardiffError("--draft-ckpt is the draft of a model trained elsewhere: pass it with --model (a "
                              "fastardiff checkpoint carries its own draft)")
    if draft_ckpt is not None and not opts.draft:
        raise FastardiffError("--draft-ckpt and --no-draft contradict each other: drop one")
    build = get_target(opts.target)          # unknown target / missing dependency fail before any work
    if model is not None:   # foreign engines: a draft only from --draft-ckpt, the cache written by the runtime
        opts = dataclasses.replace(opts, draft=draft_ckpt is not None,
                                   kv_update="host" if opts.kv_update == "auto" else opts.kv_update)
        if opts.kv_update != "host":
            raise FastardiffError("--kv-update in-place is built for fastardiff's own models; a foreign model's "
                                  "engines use --kv-update host (the default for --model)")
    opts = resolve_options(opts)
    gpu = _gpu_identity(opts.device)
    check_output_dir(out)
    if model is not None:
        from .foreign import load_foreign

        ckpt = load_foreign(model, ckpt_path, opts.atol, opts.rtol)
    else:
        ckpt = load_checkpoint(ckpt_path)
    draft_sha = None
    if draft_ckpt is not None:   # refused (one line, nothing written) unless it fits the model
        from .foreign.draft import attach_draft

        draft_sha = attach_draft(ckpt, draft_ckpt)
    cfg = ckpt.config
    ckpt_sha = sha256_file(ckpt_path)
    versions = {"fastardiff": library_versions(["fastardiff"])["fastardiff"], "python": platform.python_version(),
                "numpy": library_versions(["numpy"])["numpy"], "engine_code": engine_code_hash(),
                **library_versions(TARGET_LIBRARIES[opts.target])}
    weights = ckpt_sha if draft_sha is None else f"{ckpt_sha}+draft:{draft_sha}"    # another draft: other engines
    key = cache_key(weights, cfg.config_hash(), ckpt.calibration.to_dict(), opts, versions, gpu)
    if not opts.force:
        manifest = cached_manifest(out, key)
        if manifest is not None:
            log.info("cache hit: %s already holds %s engines for this checkpoint, options and library versions "
                     "(use --force to rebuild)", out, opts.target)
            return manifest, True

    if model is not None:   # --gamma auto's Jacobi figures (deterministic from the weights: not in the cache key)
        from .foreign.engines import calibrate_jacobi

        log.info("measuring Jacobi tokens per target call for --gamma auto (torch backend)")
        calibrate_jacobi(ckpt)
        if ckpt.draft is not None:
            from .foreign.engines import calibrate_draft

            log.info("measuring the draft's per-position acceptance (torch backend)")
            calibrate_draft(ckpt, opts.gamma)
    log.info("exporting %s (%s, config %s) to %s: target %s, %s, %s, batch <= %d, gamma %d",
             ckpt_path, cfg.name, cfg.config_hash(), out, opts.target, opts.precision, opts.device, opts.max_batch,
             opts.gamma)
    start = time.perf_counter()
    with created_dirs_removed_on_failure(out.parent):   # a failed export leaves no new directories
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            result = build(ckpt, tmp, opts)
            manifest = Manifest(
                backend=result.backend, family=cfg.family, config=cfg.to_dict(), calibration=ckpt.calibration.to_dict(),
                engines=result.engines, precision=opts.precision, device=opts.device, gamma=opts.gamma,
                max_batch=opts.max_batch, config_hash=cfg.config_hash(), library_versions={**versions,
                                                                                         **result.library_versions},
                gpu=result.gpu or gpu, plugin=result.plugin,
                export={"cache_key": key, "target": opts.target, "atol": opts.atol, "rtol": opts.rtol,
                        "onnx_only": opts.onnx_only, "checkpoint": str(ckpt_path), "checkpoint_sha256": ckpt_sha,
                        "seconds": round(time.perf_counter() - start, 2),
                        **_foreign_export(ckpt, draft_ckpt, draft_sha),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.extra})
            write_manifest(tmp, manifest)
            verify_engine_files(tmp, load_manifest(tmp))
            os.chmod(tmp, 0o755)
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("wrote %s engines and %s to %s in %.1f s", opts.target, MANIFEST_NAME, out, time.perf_counter() - start)
    return manifest, False


def _foreign_export(ckpt, draft_ckpt=None, draft_sha=None) -> dict:
    """manifest.export fields of a foreign model: its factory, the adapter's parity with the library's forward and
    the draft file it was given (path, sha256, how it was made)."""
    parity = ckpt.meta.get("library_parity") if isinstance(getattr(ckpt, "meta", None), dict) else None
    if parity is None:
        return {}
    fields = {"model": ckpt.config.factory, "library": ckpt.config.library, "library_parity": parity}
    if draft_sha is not None:
        fields.update(draft_checkpoint=str(draft_ckpt), draft_checkpoint_sha256=draft_sha,
                      draft=ckpt.meta.get("draft", {}))
    return fields
