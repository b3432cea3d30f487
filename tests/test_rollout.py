"""draft_rollout: one engine call drafts a round (the reference torch modules; the exported ONNX and AOTI engines
are checked the same way in test_export_onnx.py / test_export_aoti.py)."""
from __future__ import annotations

import numpy as np
import pytest

from rollout_check import check_rollout_matches_steps


@pytest.fixture(scope="module")
def random_engines(random_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines

    return TorchEngines(random_checkpoint, max_gamma=4)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("mode", ["off", "static", "context"])
def test_rollout_equals_gamma_step_calls(random_engines, guided, mode):
    stopped = check_rollout_matches_steps(random_engines, 4, guided, mode)
    if mode == "off":
        assert stopped == 0
    else:
        assert stopped > 0, "the thresholds were meant to stop some samples early"


def test_rollout_of_length_one_is_one_step(random_engines):
    assert check_rollout_matches_steps(random_engines, 1, False, "off") == 0


def test_loop_uses_one_rollout_call_per_round(random_engines):
    """Draft calls = verify calls (one rollout per round), and the drafts it proposes are verified."""
    from fastardiff.runtime.speculative import GenerationConfig, generate

    _, stats = generate(random_engines, np.arange(4), GenerationConfig(gamma=3, early_stop="off", eta=0.0))
    rounds = stats.target_calls
    assert stats.draft_calls == rounds
    assert stats.drafts_proposed > 2 * stats.verifies  # up to 3 drafts per round, fewer only at the end


def test_loop_without_rollouts_drafts_with_steps(random_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    engines = TorchEngines(random_checkpoint, max_gamma=2)
    _, stats = generate(engines, np.arange(2), GenerationConfig(gamma=3, early_stop="off", eta=0.0))
    assert stats.draft_calls > 2 * stats.target_calls  # gamma 3 has no rollout engine: one call per draft


@pytest.mark.parametrize("rows,dtype", [(3, "float32"), (4, "float32"), (4, "bfloat16")])   # 4 rows: guidance
def test_lean_and_stepwise_unrolls_agree(random_checkpoint, rows, dtype):
    """The lean unroll (one token per step, keys kept in-graph: the onnx / CPU aoti engines) and the stepwise one
    (the whole window re-fed through the model: the fused-kernel engines) are the same function, also in the
    reduced precisions an export may cast to (--precision bf16 / fp16)."""
    import copy

    import torch

    from fastardiff.exporter import trt_graph  # noqa: F401  registers the "plugin" implementation (CPU: reference)
    from fastardiff.exporter.engine_modules import rollout_capacity, rollout_example_inputs
    from fastardiff.exporter.rollout import DraftRollout

    cfg, gamma = random_checkpoint.config, 4
    sigma = cfg.sigma_params(1.0)
    dt = getattr(torch, dtype)
    lean = DraftRollout(copy.deepcopy(random_checkpoint.draft).to(dt), gamma, sigma).eval()
    fused_draft = copy.deepcopy(random_checkpoint.draft).to(dt)
    fused_draft.attention_impl = "plugin"
    stepwise = DraftRollout(fused_draft, gamma, sigma).eval()
    inputs = rollout_example_inputs(cfg, gamma, cfg.draft_layers, rows, 2, rollout_capacity(cfg, gamma),
                                    torch.Generator().manual_seed(rows))
    inputs = tuple(x.to(dt) if x.is_floating_point() else x for x in inputs)
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == "float32" else {"atol": 0.1, "rtol": 0.05}
    with torch.no_grad():
        a, b = lean(*inputs), stepwise(*inputs)
    assert int(b[3].min()) < gamma, "the example thresholds were meant to stop a sample early"
    for name, x, y in zip(("drafts", "draft_mean", "draft_sigma", "num_drafts", "shallow_entropy", "new_k",
                           "new_v"), a, b):
        assert bool(torch.isfinite(x.float()).all()), name
        torch.testing.assert_close(x.float(), y.float(), **tolerance, msg=name)
