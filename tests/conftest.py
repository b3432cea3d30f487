"""Shared fixtures. GPU tests are marked `gpu` and skipped cleanly without CUDA."""
from __future__ import annotations

import os
import tempfile

import pytest

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker keeps to one thread, so the
# workers do not oversubscribe the cores; a plain `pytest` run uses two.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
# `--gamma auto` plans are cached per user (runtime/plan_cache.py): a test run keeps its own cache, not ~/.cache
os.environ.setdefault("FASTARDIFF_CACHE_DIR", tempfile.mkdtemp(prefix="fastardiff-test-cache-"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config():
    from fastardiff.recipes.config import get_config

    return get_config("tiny-mnist-small")  # the quick shape; the shipped default is deeper


@pytest.fixture(scope="session")
def random_checkpoint(tiny_config):
    """A tiny-mnist checkpoint with seeded random weights (for shape/contract tests, not quality)."""
    import torch

    from fastardiff.recipes.checkpoint import DriftARCheckpoint
    from fastardiff.recipes.config import Calibration
    from fastardiff.recipes.models import build_models

    torch.manual_seed(0)
    target, draft, decoder = build_models(tiny_config)
    return DriftARCheckpoint(tiny_config, Calibration(e_max=1.0), target, draft, decoder).eval()


@pytest.fixture(scope="session")
def random_checkpoint_path(random_checkpoint, tmp_path_factory):
    from fastardiff.recipes.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt", random_checkpoint)


@pytest.fixture(scope="session")
def shipped_checkpoint_path():
    """The trained default model. It must exist: it is shipped in the repository."""
    from fastardiff.recipes.checkpoint import default_checkpoint_path

    path = default_checkpoint_path()
    assert path.exists(), f"shipped checkpoint {path} is missing; train it with `fastardiff train --recipe tiny-mnist`"
    return path


@pytest.fixture(scope="session")
def shipped_checkpoint(shipped_checkpoint_path):
    from fastardiff.recipes.checkpoint import load_checkpoint

    return load_checkpoint(shipped_checkpoint_path)


SHARED_ONNX_GAMMA = 2   # draft_rollout_1..2 (each rollout is one more engine to export on the 2-core CI machine)


@pytest.fixture(scope="session")
def shared_onnx_export(shipped_checkpoint_path, tmp_path_factory):
    """The shipped model exported to ONNX once per test run and shared by every xdist worker (the first to take
    the file lock builds it, the others get the exporter's cache hit): (engine dir, manifest, whether the first
    export of this run was a cache hit)."""
    import fcntl
    import json

    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-onnx"  # this run's workers'
    root.mkdir(exist_ok=True)
    out, record = root / "engines", root / "first-export.json"
    with open(root / "export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest, hit = export_engines(shipped_checkpoint_path, out,
                                       ExportOptions(target="onnx", gamma=SHARED_ONNX_GAMMA))
        if not record.exists():
            record.write_text(json.dumps({"hit": hit}))
        first_hit = json.loads(record.read_text())["hit"]
    return out, manifest, first_hit
