"""`fastardiff train --stage draft-onpolicy`: a few steps on a handful of target samples (random weights)."""
from __future__ import annotations

import torch

from cli_runner import run_cli


def test_draft_onpolicy_stage_changes_only_the_draft(random_checkpoint_path, tmp_path, capsys):
    from fastardiff.recipes.checkpoint import load_checkpoint

    code, out, err = run_cli(["train", "--stage", "draft-onpolicy", "--init", str(random_checkpoint_path),
                              "--out", str(tmp_path / "run"), "--samples", "6", "--steps", "3",
                              "--calibration-images", "8", "--threads", "1", "--no-progress"], capsys)
    assert code == 0, err
    path = tmp_path / "run" / "tiny-mnist.pt"
    assert path.exists() and path.with_suffix(".json").exists()
    before, after = load_checkpoint(random_checkpoint_path), load_checkpoint(path)
    for name in ("target", "decoder"):  # bit-identical: target-only quality cannot change
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    qa, qb = before.draft.state_dict(), after.draft.state_dict()
    assert any(not torch.equal(qa[k], qb[k]) for k in qa)  # the draft was trained
    # the draft-dependent calibration was recomputed (the input had none), the target's one copied
    assert after.calibration.draft_shallow_mean != before.calibration.draft_shallow_mean
    assert after.calibration.draft_shallow_std > 0
    assert after.calibration.e_max == before.calibration.e_max
    assert after.calibration.tau_static != before.calibration.tau_static
    meta = after.meta["draft_onpolicy"]
    assert after.meta["stage"] == "draft-onpolicy"
    assert meta["settings"]["samples"] == 6 and meta["settings"]["steps"] == 3
    assert set(meta["acceptance_estimate_after"]) == {"cfg1", "cfg2"}
    assert "--stage draft-onpolicy" in meta["command"] and "--samples 6 --steps 3" in meta["command"]


def test_draft_onpolicy_flags_need_the_stage(tmp_path, capsys):
    code, out, err = run_cli(["train", "--out", str(tmp_path / "x"), "--samples", "5"], capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--stage draft-onpolicy" in lines[0]
    assert not (tmp_path / "x").exists()


def test_residual_contexts_replace_one_token_per_copy(random_checkpoint):
    """Each copy differs from its sequence in exactly one token, at t in [3, N - 2], drawn from the residual
    max(0, p - q): on these random weights p and q differ, so a residual sample is never the draft's own mean."""
    import numpy as np

    from fastardiff.recipes.distill_draft import residual_context_tokens
    from fastardiff.recipes.evaluate import sigma_params

    cfg = random_checkpoint.config
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(24, cfg.num_tokens, cfg.token_dim, generator=g)
    labels = torch.arange(24) % cfg.num_classes
    out, t = residual_context_tokens(random_checkpoint, tokens, labels, sigma_params(random_checkpoint),
                                     np.random.default_rng(0), batch=10)     # batches of 10: the split is exercised
    changed = (out != tokens).any(-1)
    assert changed.sum(1).tolist() == [1] * 24
    assert torch.equal(changed.float().argmax(1), t) and int(t.min()) >= 3 and int(t.max()) <= cfg.num_tokens - 2
    assert torch.isfinite(out).all()


def test_draft_onpolicy_with_residual_contexts(random_checkpoint_path, tmp_path, capsys):
    from fastardiff.recipes.checkpoint import load_checkpoint

    args = ["train", "--stage", "draft-onpolicy", "--init", str(random_checkpoint_path), "--out",
            str(tmp_path / "run"), "--samples", "6", "--steps", "3", "--calibration-images", "8", "--threads", "1",
            "--no-progress"]
    code, out, err = run_cli(args + ["--residual-contexts", "0.5"], capsys)
    assert code == 0, err
    meta = load_checkpoint(tmp_path / "run" / "tiny-mnist.pt").meta["draft_onpolicy"]
    assert meta["settings"]["residual_contexts"] == 0.5 and "--residual-contexts 0.5" in meta["command"]
    bad = [str(tmp_path / "bad") if a == str(tmp_path / "run") else a for a in args]
    code, out, err = run_cli(bad + ["--residual-contexts", "1.5"], capsys)
    assert code == 2 and "--residual-contexts" in err and not (tmp_path / "bad").exists()
    code, out, err = run_cli(["train", "--out", str(tmp_path / "y"), "--residual-contexts", "0.5"], capsys)
    assert code != 0 and "--stage draft-onpolicy" in err and not (tmp_path / "y").exists()
