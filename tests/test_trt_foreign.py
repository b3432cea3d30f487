"""Models trained elsewhere through `--target trt` with the real TensorRT for RTX builder, on a machine without a GPU:
an x-transformers model (absolute positions and LayerNorm, whose `gamma` weight once broke the plugin-node count)
exported by the Python call, a Hugging Face Llama backbone with its Gaussian head by `fastardiff export --model`.
Every engine of each export is checked: TensorRT-RTX's serialized-engine magic, the manifest's bytes / sha256 /
build seconds, and the optimisation profile TensorRT holds against the manifest's shape profile and the model's
KV-cache geometry. Built, not run: deserialising an engine needs a GPU (none here)."""
from __future__ import annotations

import hashlib
import importlib
import json

import pytest
import torch

from cli_runner import run_cli


def _rtx_importable() -> bool:
    try:                        # not installed, or installed but not loadable (its shared libraries missing)
        importlib.import_module("tensorrt_rtx")
        return True
    except (ImportError, OSError):
        return False


needs_rtx = pytest.mark.skipif(not _rtx_importable(), reason="tensorrt_rtx is not importable (pip install "
                               "'fastardiff[trt-rtx]')")
CAPABILITIES = ("8.6",)
BATCH, GAMMA = 2, 2


@pytest.fixture(scope="module")
def quick_calibration():
    """--gamma auto's Jacobi calibration at export, cut to one window over two images (the tests check builds)."""
    from fastardiff.exporter.foreign import engines as foreign_engines

    saved = foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES
    foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES = (2,), 2
    yield
    foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES = saved


@pytest.fixture(scope="module")
def xt_engines(tmp_path_factory, quick_calibration):
    from fastardiff.exporter.foreign import export_foreign

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("xt-trt")
    spec = __import__("foreign_factories").absolute_layernorm()
    torch.save(spec.model.state_dict(), base / "w.pt")
    manifest, hit = export_foreign("foreign_factories:absolute_layernorm", base / "w.pt", base / "engines",
                                   target="trt", trt_library="tensorrt_rtx", compute_capabilities=CAPABILITIES,
                                   max_batch=BATCH, gamma=GAMMA)
    assert not hit
    return base / "engines"


@pytest.fixture(scope="module")
def llama_engines(tmp_path_factory, quick_calibration):
    from fastardiff.recipes import hf_llama_mnist as hf

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("llama-trt")
    torch.manual_seed(0)
    hf.save_state_dict(hf.build("llama"), base / "w.pt")
    return base


def _check_engines(out, library: str, layers: int, kv_heads: int, head_dim: int):
    data = json.loads((out / "manifest.json").read_text())
    trt = data["export"]["trt"]
    assert data["family"] == "foreign-gaussian" and data["config"]["library"] == library
    assert trt["library"] == "tensorrt_rtx" and trt["compute_capabilities"] == list(CAPABILITIES)
    assert sorted(data["engines"]) == sorted(trt["engines"]) == ["decoder", "target_verify"]
    cfg = data["config"]
    tokens = (cfg["image_size"] // cfg["patch"]) ** 2
    for name, entry in data["engines"].items():
        blob = (out / entry["file"]).read_bytes()
        stats = trt["engines"][name]
        assert entry["file"] == f"{name}.engine" and blob[:4] == b"vtrt", name     # TensorRT-RTX's engine magic
        assert stats["bytes"] == len(blob) > 100_000 and hashlib.sha256(blob).hexdigest() == entry["sha256"]
        assert stats["seconds"] > 0 and stats["progress_callbacks"] > 0 and stats["plugin_layers"] == 0
        assert all(v["mismatches"] == 0 for v in entry["parity"]["outputs"].values())
        held = stats["profile"]       # what TensorRT holds: input -> [min, opt, max]
        corners = list(zip(entry["profile"]["batch"], entry["profile"]["K"], entry["profile"]["cache"]))
        assert corners[-1][0] == BATCH
        if name == "target_verify":
            assert held["tokens"] == [[b, k, cfg["token_dim"]] for b, k, _ in corners]
            for cache in ("k_cache", "v_cache"):
                assert held[cache] == [[layers, b, kv_heads, s, head_dim] for b, _, s in corners]
            assert held["lengths"] == held["cond"] == [[b] for b, _, _ in corners]
            # the whole sequence in one call, and the last token's call over every position before it, fit
            assert corners[-1][1] >= tokens and corners[-1][2] >= tokens - 1
        else:
            assert held["tokens"] == [[b, tokens, cfg["token_dim"]] for b, _, _ in corners]
    return data


@needs_rtx
def test_xtransformers_engines_are_tensorrt_rtx_engines(xt_engines):
    data = _check_engines(xt_engines, "x-transformers", layers=2, kv_heads=4, head_dim=8)
    assert data["config"]["architecture"]["positions"] == "absolute"


@needs_rtx
def test_llama_engines_built_by_the_export_command(llama_engines, capsys):
    out = llama_engines / "engines"
    code, _, err = run_cli(["export", "--model", "fastardiff.recipes.hf_llama_mnist:digits", "--ckpt",
                            str(llama_engines / "w.pt"), "--target", "trt", "--trt-library", "tensorrt_rtx",
                            "--compute-capability", ",".join(CAPABILITIES), "--batch", str(BATCH), "--gamma",
                            str(GAMMA), "--out", str(out)], capsys)
    assert code == 0, err
    data = _check_engines(out, "transformers", layers=2, kv_heads=2, head_dim=16)
    assert data["config"]["architecture"]["class"] == "LlamaModel"


def test_plugin_count_ignores_library_weights_named_like_fastardiff_flags():
    """x-transformers' LayerNorm has a `gamma` Parameter: the plugin-node count reads fastardiff's own int flags
    only (max() over the weight raised 'Boolean value of Tensor ... is ambiguous') and counts 0 for a model
    without entropy attention."""
    from fastardiff.exporter.trt_graph import expected_plugin_nodes

    class LibraryNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = torch.nn.Parameter(torch.ones(8))
            self.shallow_entropy = torch.zeros(3)

    assert expected_plugin_nodes(torch.nn.Sequential(LibraryNorm(), torch.nn.Linear(8, 8))) == 0
