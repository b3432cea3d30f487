"""A draft for a model trained elsewhere (recipes/foreign_draft.py, exporter/foreign/draft.py): made from the frozen
target's samples, exported with `--draft-ckpt` as draft_step beside the target's engines, and run by `--draft model`
with the exact diagonal-Gaussian acceptance: target-only and model-draft runs on the same ONNX engines sample one
distribution (two-sample test), and the test fails for an acceptance that reads q's variance as its std."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_runner import run_cli
from fastardiff.recipes import xtransformers_mnist as xt
from fastardiff.recipes.two_sample import two_sample_pvalue

pytestmark = pytest.mark.slow
REF = "fastardiff.recipes.xtransformers_mnist:digits_small"
TOKENS = 8          # tokens per sequence in the two-sample tests
SAMPLES = 300


@pytest.fixture(scope="session")
def target_weights(tmp_path_factory):
    torch.set_num_threads(1)
    wrapper = xt.digits_small().model
    xt.train(wrapper, steps=40, batch=32, lr=3e-3, progress=False)
    return xt.save_state_dict(wrapper, tmp_path_factory.mktemp("xt-draft") / "small.pt")


@pytest.fixture(scope="session")
def draft_file(target_weights):
    from fastardiff.recipes.foreign_draft import ForeignDraftSettings, make_draft

    # barely fitted on purpose: an acceptance bug shows where q differs from p (a draft fitted well, with q ~ p, hides
    # the variance-as-std mutant from 2000 whole images: p = 0.05, docs/foreign-draft.json)
    settings = ForeignDraftSettings(samples=40, steps=25, batch_size=16, sample_batch=40, eval_samples=10,
                                    log_every=1000)
    return make_draft(REF, target_weights, target_weights.parent / "draft.pt", settings)


@pytest.fixture(scope="session")
def engines_dir(target_weights, draft_file):
    from fastardiff.exporter.foreign import engines as foreign_engines
    from fastardiff.exporter.foreign import export_foreign

    out = target_weights.parent / "engines"
    saved = foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES
    foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES = (2,), 6      # the quick calibrations
    try:
        _, hit = export_foreign(REF, target_weights, out, target="onnx", draft=draft_file, max_batch=8, gamma=3)
    finally:
        foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES = saved
    assert not hit
    return out


def test_draft_file_is_plain_data(draft_file):
    payload = torch.load(draft_file, map_location="cpu", weights_only=True)
    assert payload["format"] == "fastardiff-foreign-draft" and payload["config"]["token_dim"] == 16
    meta = payload["meta"]
    assert meta["samples"] == 40 and meta["kl_after"] < meta["kl_before"]     # the fit moved toward the target


def test_export_adds_a_draft_step_that_passes_its_parity_gate(engines_dir, draft_file):
    data = json.loads((engines_dir / "manifest.json").read_text())
    assert sorted(data["engines"]) == ["decoder", "draft_step", "target_verify"]
    parity = data["engines"]["draft_step"]["parity"]["outputs"]
    assert parity and all(v["mismatches"] == 0 for v in parity.values())
    assert data["config"]["draft_layers"] == 1 and data["export"]["draft_checkpoint_sha256"]
    curve = data["calibration"]["extra"]["acceptance_by_position"]["1"]      # --gamma auto's model-draft figures
    assert len(curve) == 3 and all(0.0 <= a <= 1.0 for a in curve)


def test_cache_key_includes_the_draft_weights(engines_dir, target_weights, draft_file, tmp_path, monkeypatch):
    from fastardiff.exporter.foreign import engines as foreign_engines
    from fastardiff.exporter.foreign import export_foreign

    _, hit = export_foreign(REF, target_weights, engines_dir, target="onnx", draft=draft_file, max_batch=8, gamma=3)
    assert hit
    payload = torch.load(draft_file, map_location="cpu", weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 0.01         # same shapes, other weights
    other = tmp_path / "other.pt"
    torch.save(payload, other)

    class Rebuilt(Exception):
        pass

    def rebuild(*args, **kwargs):
        raise Rebuilt

    monkeypatch.setattr(foreign_engines, "calibrate_jacobi", rebuild)        # the first step of a rebuild
    with pytest.raises(Rebuilt):
        export_foreign(REF, target_weights, engines_dir, target="onnx", draft=other, max_batch=8, gamma=3)


def tokens_of(engines, **gen):
    from fastardiff.runtime.speculative import GenerationConfig, generate

    classes = np.arange(SAMPLES) % 10
    return generate(engines, classes, GenerationConfig(num_tokens=TOKENS, **gen))


def test_model_draft_samples_the_target_distribution(engines_dir, monkeypatch):
    """Target-only and --draft model on the same engines: one distribution by the two-sample test; an acceptance
    that reads the draft's variance as its standard deviation (drafts still drawn from q) is caught."""
    from fastardiff.runtime import proposals
    from fastardiff.runtime.engine import load_engines

    engines = load_engines(engines_dir)
    target, _ = tokens_of(engines, mode="target", seed=31)
    drafted, stats = tokens_of(engines, mode="speculative", draft="model", gamma=3, early_stop="off", seed=32)
    assert stats.drafts_accepted > 0 and stats.draft_calls > 0              # it speculated with the draft model
    assert two_sample_pvalue(drafted, target) > 1e-3

    exact = proposals.accept_drafts

    def variance_as_std(rng, drafts, num_drafts, p, q, *rest):
        return exact(rng, drafts, num_drafts, p, q._replace(sigma=q.sigma ** 2), *rest)

    monkeypatch.setattr(proposals, "accept_drafts", variance_as_std)
    wrong, _ = tokens_of(engines, mode="speculative", draft="model", gamma=3, early_stop="off", seed=32)
    assert two_sample_pvalue(wrong, target) < 1e-3


def test_run_cli_with_the_model_draft(engines_dir, tmp_path, capsys):
    code, out, err = run_cli(["run", "--engine", str(engines_dir), "--prompt", "3,7", "--draft", "model", "--gamma",
                              "2", "--out", str(tmp_path / "d.png"), "-v"], capsys)
    assert code == 0 and (tmp_path / "d.png").stat().st_size > 0, err
    assert "rate model:2" in out + err


def _edited(draft_file, tmp_path, edit) -> str:
    payload = torch.load(draft_file, map_location="cpu", weights_only=True)
    edit(payload)
    path = tmp_path / "bad-draft.pt"
    torch.save(payload, path)
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["config"].update(token_dim=9), "its token dim is 9, the model's is 16"),
    (lambda p: p["config"].update(num_classes=3), "its classes is 3, the model's is 10"),
    (lambda p: p["config"].update(positions=17), "its positions (1 + tokens - 1) is 17, the model's is 64"),
    (lambda p: p.update(format="something else"), "is not a fastardiff foreign draft"),
    (lambda p: p["state_dict"].pop("model.head.bias"), "its weights do not match its config"),
])
def test_a_draft_that_does_not_fit_is_one_error_line_and_nothing_written(target_weights, draft_file, tmp_path,
                                                                           capsys, edit, message):
    bad = _edited(draft_file, tmp_path, edit)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(["export", "--model", REF, "--ckpt", str(target_weights), "--draft-ckpt", bad,
                            "--target", "onnx", "--out", str(tmp_path / "engines")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "fastardiff.recipes.foreign_draft" in lines[0]                  # the fix: make one for this model
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_draft_ckpt_needs_a_foreign_model(draft_file, tmp_path, capsys):
    code, _, err = run_cli(["export", "--draft-ckpt", str(draft_file), "--target", "onnx", "--out",
                            str(tmp_path / "engines")], capsys)
    assert code == 2 and "--draft-ckpt is the draft of a model trained elsewhere" in err
    assert not (tmp_path / "engines").exists()


def test_foreign_engines_without_a_draft_keep_their_refusal():
    from types import SimpleNamespace

    from fastardiff.runtime.generation import GenerationError, check_draft_supported

    without = SimpleNamespace(family="foreign-gaussian", engines={"target_verify": 1, "decoder": 1})
    with pytest.raises(GenerationError, match="a model exported with --model comes without one"):
        check_draft_supported(without, "speculative", "model")
    check_draft_supported(SimpleNamespace(family="foreign-gaussian", engines={**without.engines, "draft_step": 1}),
                          "speculative", "model")


def test_trt_plugin_count_ignores_a_library_tensor_named_gamma():
    """`--target trt` counts the entropy-attention nodes per engine by its modules' int `gamma` (a rollout's length);
    x-transformers' norms have a tensor `gamma` of their own, which once failed every foreign trt export."""
    from torch import nn

    from fastardiff.exporter.trt_graph import expected_plugin_nodes
    from fastardiff.recipes.config import DriftARConfig
    from fastardiff.recipes.models import ARTransformer

    holder = nn.Module()
    holder.library, holder.draft = xt.build(dim=32, depth=2, heads=4), ARTransformer(DriftARConfig(), 1)
    assert any(isinstance(getattr(m, "gamma", None), torch.Tensor) for m in holder.modules())
    assert expected_plugin_nodes(holder) == 1
