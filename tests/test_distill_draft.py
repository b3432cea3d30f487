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
