"""Probe: does fine-tuning the draft on contexts that end in a residual sample raise the first-position acceptance?

In the real loop a round's first draft follows a residual sample (drawn from max(0, p - q): where the draft was
wrong) or a bonus token, and is accepted far less often (0.43) than later drafts (0.65-0.80)
(docs/draft-acceptance.md). This fine-tunes a copy of the shipped draft on target-sampled sequences in which one
token per sequence is replaced by a residual sample of the draft against the target at that position, the
target's outputs recomputed teacher-forced on the modified sequence (distill loss L_reg + 10 L_entropy,
positions right after the replaced token weighted up), mixed half and half with unmodified sequences; then
measures the per-position acceptance of the real loop (exporter/calibrate.py, torch backend) for both drafts.

    python benchmarks/residual_context_probe.py --train 3000 --steps 1500
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from fastardiff.exporter.calibrate import measure_position_acceptance
from fastardiff.recipes.checkpoint import default_checkpoint_path, load_checkpoint
from fastardiff.recipes.distill_draft import distill_loss, residual_context_tokens
from fastardiff.recipes.evaluate import sample_target_only, sigma_params
from fastardiff.recipes.target_cache import PrecomputedTarget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--after-weight", type=float, default=4.0, help="loss weight of the position after a residual")
    ap.add_argument("--images", type=int, default=200, help="images for the loop's per-position acceptance")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.time()
    ckpt = load_checkpoint(default_checkpoint_path())
    cfg, sp = ckpt.config, sigma_params(ckpt)
    gen, rng = torch.Generator().manual_seed(args.seed), np.random.default_rng(args.seed)
    labels = torch.arange(args.train) % cfg.num_classes
    tokens = torch.cat([sample_target_only(ckpt, labels[i:i + 500], 1.0, 1.0, gen)[0]
                        for i in range(0, args.train, 500)])
    modified, replaced = residual_context_tokens(ckpt, tokens, labels, sp, rng)
    inputs = torch.cat([tokens, modified])
    cond_all = torch.cat([labels, labels])
    with torch.no_grad():
        outs = [ckpt.target.forward_sequence(inputs[i:i + 500], cond_all[i:i + 500]) for i in range(0, len(inputs), 500)]
    z_p, e_p = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    weight = torch.ones(len(inputs), cfg.num_tokens)
    weight[torch.arange(args.train) + args.train, replaced + 1] = args.after_weight  # predicts token t + 1
    print(f"{len(inputs)} training sequences in {time.time() - started:.0f} s")
    draft = copy.deepcopy(ckpt.draft).train().requires_grad_(True)
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.01)
    for step in range(args.steps):
        idx = torch.randint(0, len(inputs), (128,), generator=gen)
        loss, _ = distill_loss(PrecomputedTarget(z_p[idx], e_p[idx]), draft, inputs[idx], cond_all[idx], sp, 10.0,
                               weight[idx])                  # the recipe's weighted loss on precomputed targets
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    tuned = dataclasses.replace(ckpt, draft=draft.eval().requires_grad_(False))
    for name, c in (("shipped draft", ckpt), ("residual-context draft", tuned)):
        curve = measure_position_acceptance(c, gamma=4, images=args.images, scales=(1.0,), seed=args.seed)["1"]
        print(f"{name}: loop acceptance by position {curve}")
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
