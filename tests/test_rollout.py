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
