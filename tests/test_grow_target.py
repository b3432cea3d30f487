"""--grow-target-from: a deeper target initialised from a trained shallower one computes the same function."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastardiff.errors import FastardiffError
from fastardiff.recipes.checkpoint import DriftARCheckpoint, save_checkpoint
from fastardiff.recipes.config import Calibration, get_config
from fastardiff.recipes.models import build_models
from fastardiff.recipes.train import grow_target, grown_positions


def test_grown_positions_keep_first_penultimate_and_last():
    assert grown_positions(4, 12) == [0, 5, 10, 11]
    assert grown_positions(3, 12) == [0, 10, 11]
    assert grown_positions(2, 12) == [0, 11]
    assert grown_positions(4, 4) == [0, 1, 2, 3]
    with pytest.raises(FastardiffError):
        grown_positions(5, 4)


def test_grown_target_computes_the_same_means_and_entropies(random_checkpoint, tmp_path):
    small = save_checkpoint(tmp_path / "small.pt", random_checkpoint)
    deep_cfg = dataclasses.replace(random_checkpoint.config, target_layers=9)
    torch.manual_seed(1)
    deep, _, _ = build_models(deep_cfg)
    grow_target(deep, str(small))
    tokens, cond = torch.randn(3, deep_cfg.num_tokens, deep_cfg.token_dim), torch.tensor([1, 4, 10])
    with torch.no_grad():
        want = random_checkpoint.target.forward_sequence(tokens, cond)
        got = deep.eval().forward_sequence(tokens, cond)
    for w, g in zip(want, got):  # mean, penultimate-layer entropy (sigma), shallow entropy
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert deep.entropy_layer == 7 and random_checkpoint.target.entropy_layer == 2
    identity = [i for i in range(9) if i not in grown_positions(4, 9)]
    assert all(deep.blocks[i].mlp[2].weight.abs().sum() == 0 for i in identity)


def test_growing_needs_the_same_width(random_checkpoint, tmp_path):
    other = dataclasses.replace(get_config("tiny-mnist-small"), width=32, heads=4)
    torch.manual_seed(0)
    narrow = DriftARCheckpoint(other, Calibration(e_max=1.0), *build_models(other)).eval()
    path = save_checkpoint(tmp_path / "narrow.pt", narrow)
    deep, _, _ = build_models(dataclasses.replace(random_checkpoint.config, target_layers=8))
    with pytest.raises(FastardiffError, match="does not fit"):
        grow_target(deep, str(path))
