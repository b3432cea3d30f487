"""The fast-ardiff training recipe (issue 12 items 2-3) on the tiny-mnist data; seeded, resumable, progress bars.

Stages (one global step counter: teacher, draft, cd, dmd; a stage not selected has 0 steps):
  teacher  the target AR (initialised from the shipped drift-ar target, its output Linear replaced by a z_dim
           one) and the teacher head, trained jointly with improved DDPM's hybrid loss (eps MSE + the
           learned-variance VLB term, mean stop-gradient) on the MNIST tokens, class dropout 10% (null class).
           CPU budget: the first target_layers - train_blocks blocks stay frozen and their outputs on the
           (clean, teacher-forced) training digits are computed once for the real and the null class; the last
           train_blocks blocks, the final norm, the new output Linear and the head are trained.
  (calibration of the target's entropy, as drift-ar; the target is frozen from here on and its outputs z and
   entropies on the training digits are computed once: the conditions of every later stage.)
  draft    the draft (initialised from the target as drift-ar does) with L_reg + w_E L_entropy
           (recipes/distill_draft.py distill_loss against the frozen target; w_E = entropy_weight, 0 for the
           ablation), alpha = 1.
  cd, dmd  the head's two-stage step distillation (recipes/head_distill.py) with the dynamic weight of
           fast-ardiff Eq. 8-9: total = alpha(t) (L_reg + L_entropy) + (1 - alpha(t)) L_dist, alpha annealed
           0.95 -> 0.05 linearly over the cd + dmd steps; the draft keeps training. The student starts from the
           teacher (student_init=teacher) or from random weights (the DMD-from-scratch ablation); the
           fake-score head of DMD starts from the teacher.
Outputs in --out: resume-state.pt, after-teacher.pt / after-cd.pt (stage snapshots), <config name>.pt.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastardiff.errors import FastardiffError

from .checkpoint import atomic_torch_save, default_checkpoint_path, load_checkpoint
from .config import Calibration, FastARDiffConfig, get_config
from .data import BatchSampler, image_tokens, load_digit_split
from .diffusion_head import DiffusionHead, cosine_alpha_bar, hybrid_loss, step_schedule
from .distill_draft import distill_loss
from .fast_ardiff import FastARDiffCheckpoint, build_fast_ardiff_models, save_checkpoint
from .head_distill import consistency_loss, dmd_loss, ema_update, fake_score_loss
from .target_cache import PrecomputedTarget, hidden_cache, pick, run_last_blocks, target_outputs
from .train import alpha_at, calibrate_target, cosine_lr, entropy_statistics, init_draft_from_target

log = logging.getLogger(__name__)

RESUME_FILE = "resume-state.pt"
RESUME_FORMAT = "fastardiff-fast-ardiff-train-state"
STAGES = ("teacher", "draft", "cd", "dmd")
MODULE_NAMES = ("target", "draft", "teacher_head", "student_head", "ema_head", "fake_head")


@dataclass
class FastARDiffTrainSettings:
    recipe: str = "tiny-mnist-fast-ardiff"
    stages: tuple = STAGES
    init: str | None = None          # a fast-ardiff checkpoint to start from (skips the teacher stage)
    init_target: str | None = None   # drift-ar checkpoint whose target starts the AR [the shipped tiny-mnist]
    teacher_steps: int = 2000
    draft_steps: int = 500
    cd_steps: int = 1000
    dmd_steps: int = 500
    batch_images: int = 32           # teacher / draft batch (all N tokens of each image)
    distill_images: int = 16         # cd / dmd batch
    train_blocks: int = 2            # trained last blocks of the target in the teacher stage
    teacher_lr: float = 1e-3
    target_lr: float = 3e-4
    draft_lr: float = 3e-4
    cd_lr: float = 2e-4
    dmd_lr: float = 2e-5
    fake_lr: float = 2e-4
    fake_updates: int = 2
    dmd_cd_anchor: float = 5.0      # weight of the consistency term in the DMD stage (0: pure DMD)
    class_dropout: float = 0.1
    vlb_weight: float = 0.01
    entropy_weight: float = 10.0
    cd_skip: int = 10
    ema_decay: float = 0.95
    student_init: str = "teacher"    # or "random": the DMD-from-scratch ablation
    e_max_percentile: float = 99.0
    calibration_images: int = 2000
    seed: int = 0
    save_every: int = 200
    train_images: int | None = None  # use only the first this many training digits (tests)

    def stage_steps(self) -> dict:
        steps = {"teacher": self.teacher_steps, "draft": self.draft_steps, "cd": self.cd_steps, "dmd": self.dmd_steps}
        return {k: (v if k in self.stages else 0) for k, v in steps.items()}

    def stage_at(self, step: int) -> tuple[str, int, int]:
        """(stage, step within it, its length) of global step `step`."""
        begin = 0
        for name, n in self.stage_steps().items():
            if step < begin + n:
                return name, step - begin, n
            begin += n
        raise IndexError(step)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise FastardiffError(f"unknown stages {unknown}; use some of {', '.join(STAGES)}")
        if "teacher" not in self.stages and not self.init:
            raise FastardiffError("without the teacher stage pass --init with a fast-ardiff checkpoint")
        if self.student_init not in ("teacher", "random"):
            raise FastardiffError(f"student_init '{self.student_init}': use teacher or random")


class Trainer:
    """Holds the models, optimizers and data of one run; `step()` runs one global step."""

    def __init__(self, s: FastARDiffTrainSettings, out_dir: Path, cache_dir: Path):
        self.s, self.out_dir, self.cache_dir = s, out_dir, cache_dir
        cfg = get_config(s.recipe)
        if not isinstance(cfg, FastARDiffConfig):
            raise FastardiffError(f"recipe '{s.recipe}' is not a fast-ardiff config")
        self.cfg = cfg
        torch.manual_seed(s.seed)
        self.split = load_digit_split()
        limit = s.train_images or len(self.split.train_images)
        self.tokens = image_tokens(self.split.train_images[:limit], cfg.patch)
        self.labels = self.split.train_labels[:limit]
        self.alpha_bar = cosine_alpha_bar(cfg.teacher_steps)
        self.student_timesteps = step_schedule(cfg.teacher_steps, cfg.student_steps)
        target, draft, teacher, student = build_fast_ardiff_models(cfg)
        self.calibration: Calibration | None = None
        if s.init:
            ckpt = load_checkpoint(s.init)
            if not isinstance(ckpt, FastARDiffCheckpoint) or ckpt.config != cfg:
                raise FastardiffError(f"--init '{s.init}' is not a '{cfg.name}' fast-ardiff checkpoint")
            for mine, theirs in ((target, ckpt.target), (draft, ckpt.draft), (teacher, ckpt.teacher_head),
                                 (student, ckpt.student_head)):
                mine.load_state_dict(theirs.state_dict())
            self.calibration = ckpt.calibration
        else:
            self.warm_start_target(target, s.init_target or str(default_checkpoint_path()))
        if s.student_init == "random":
            student = DiffusionHead(cfg)
        self.m = {"target": target, "draft": draft, "teacher_head": teacher, "student_head": student,
                  "ema_head": copy.deepcopy(student), "fake_head": copy.deepcopy(teacher)}
        self.frozen_blocks = cfg.target_layers - s.train_blocks
        teacher_params = [p for i, b in enumerate(target.blocks) if i >= self.frozen_blocks for p in b.parameters()]
        teacher_params += list(target.norm.parameters()) + list(target.head.parameters())
        self.opts = {
            "teacher": torch.optim.AdamW([{"params": teacher_params, "lr": s.target_lr, "base": s.target_lr},
                                          {"params": list(teacher.parameters()), "lr": s.teacher_lr,
                                           "base": s.teacher_lr}], weight_decay=0.0),
            "draft": torch.optim.AdamW(draft.parameters(), lr=s.draft_lr, weight_decay=0.01),
            "student": torch.optim.AdamW(student.parameters(), lr=s.cd_lr, weight_decay=0.0),
            "fake": torch.optim.AdamW(self.m["fake_head"].parameters(), lr=s.fake_lr, weight_decay=0.0)}
        self.sampler = BatchSampler(len(self.tokens), s.batch_images, s.seed)
        self.hidden = self.outputs = None
        self.snapshots_written: set = set()

    @staticmethod
    def warm_start_target(target, path: str) -> None:
        source = load_checkpoint(path)
        mine = target.state_dict()
        kept = {k: v for k, v in source.target.state_dict().items() if k in mine and mine[k].shape == v.shape}
        if len(kept) < len(mine) - 2:
            raise FastardiffError(f"--init-target '{path}': its target does not have this recipe's AR shape")
        target.load_state_dict({**mine, **kept})
        log.info("target warm-started from %s (%d of %d tensors; the output Linear is new)", path, len(kept), len(mine))

    def batch(self, n: int):
        idx = torch.randint(0, len(self.tokens), (n,), generator=self.sampler.generator)
        use_null = torch.rand(n, generator=self.sampler.generator) < self.s.class_dropout
        return idx, use_null

    def set_lr(self, opt, step: int, total: int, base: float | None = None) -> None:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, base if base is not None else g.get("base", g["lr"]),
                                warmup=min(100, max(1, total // 10)))

    def teacher_step(self, k: int, n: int) -> dict:
        target, head = self.m["target"], self.m["teacher_head"]
        if self.hidden is None:
            log.info("computing the frozen blocks' outputs on %d digits", len(self.tokens))
            self.hidden = hidden_cache(target, self.tokens, self.labels, self.cfg.num_classes, self.frozen_blocks)
        target.train()
        head.train()
        opt = self.opts["teacher"]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(k, n, g["base"], warmup=min(100, max(1, n // 10)))
        idx, use_null = self.batch(self.s.batch_images)
        hidden = torch.where(use_null.view(-1, 1, 1), self.hidden["null"][idx], self.hidden["cond"][idx])
        z, _ = run_last_blocks(target, hidden, self.frozen_blocks)
        x0 = self.tokens[idx]
        loss, stats = hybrid_loss(head, x0.reshape(-1, x0.shape[-1]), z.reshape(-1, z.shape[-1]), self.alpha_bar,
                                  self.cfg.x0_clip, self.s.vlb_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        return stats

    def ensure_frozen_target(self) -> None:
        target = self.m["target"].eval().requires_grad_(False)
        if self.calibration is None:
            self.calibration = calibrate_target(target, self.split, self.cfg, self.s)
        if self.outputs is None:
            log.info("computing the frozen target's z and entropy on %d digits", len(self.tokens))
            self.hidden = None
            self.outputs = target_outputs(target, self.tokens, self.labels, self.cfg, self.cache_dir)
            self.m["teacher_head"].eval().requires_grad_(False)

    def draft_loss(self, idx, use_null, alpha: float):
        draft = self.m["draft"].train()
        stub = PrecomputedTarget(pick(self.outputs, "z", idx, use_null), pick(self.outputs, "e", idx, use_null))
        cond = torch.where(use_null, torch.full_like(self.labels[idx], self.cfg.num_classes), self.labels[idx])
        sp = self.cfg.sigma_params(self.calibration.e_max)
        loss, stats = distill_loss(stub, draft, self.tokens[idx], cond, sp, self.s.entropy_weight)
        return alpha * loss, stats

    def draft_update(self, loss) -> None:
        opt = self.opts["draft"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.m["draft"].parameters(), 1.0)
        opt.step()

    def draft_step(self, k: int, n: int) -> dict:
        self.ensure_frozen_target()
        if k == 0:  # as drift-ar: embeddings, the first blocks, the final norm and the head of the target
            init_draft_from_target(self.m["draft"], self.m["target"])
        self.set_lr(self.opts["draft"], k, n, self.s.draft_lr)
        idx, use_null = self.batch(self.s.batch_images)
        loss, stats = self.draft_loss(idx, use_null, 1.0)
        self.draft_update(loss)
        return stats

    def distill_step(self, stage: str, k: int, n: int) -> dict:
        self.ensure_frozen_target()
        s = self.s
        steps = s.stage_steps()
        progress = (k + (steps["cd"] if stage == "dmd" else 0)) / max(1, steps["cd"] + steps["dmd"])
        alpha = alpha_at(progress, "linear")
        self.set_lr(self.opts["draft"], k, n, s.draft_lr)
        if k == 0:
            self.start_distill_stage(stage)
        idx, use_null = self.batch(s.distill_images)
        draft_loss, stats = self.draft_loss(idx, use_null, alpha)
        self.draft_update(draft_loss)
        z = pick(self.outputs, "z", idx, use_null).reshape(-1, self.cfg.z_dim)
        student, teacher = self.m["student_head"].train(), self.m["teacher_head"]
        opt = self.opts["student"]
        self.set_lr(opt, k, n, s.cd_lr if stage == "cd" else s.dmd_lr)
        if stage == "cd":
            x0 = self.tokens[idx].reshape(-1, self.cfg.token_dim)
            loss, head_stats = consistency_loss(student, self.m["ema_head"], teacher, x0, z, self.alpha_bar,
                                                s.cd_skip, self.cfg.x0_clip)
        else:
            loss, x0_student, head_stats = dmd_loss(student, teacher, self.m["fake_head"], z, self.student_timesteps,
                                                    self.alpha_bar, self.cfg.num_tokens, self.cfg.x0_clip)
            if s.dmd_cd_anchor > 0:  # the frozen CD student (ema_head, no longer updated) as the consistency target
                x0 = self.tokens[idx].reshape(-1, self.cfg.token_dim)
                anchor, anchor_stats = consistency_loss(student, self.m["ema_head"], teacher, x0, z, self.alpha_bar,
                                                        s.cd_skip, self.cfg.x0_clip)
                loss = loss + s.dmd_cd_anchor * anchor
                head_stats.update(anchor_stats)
        opt.zero_grad(set_to_none=True)
        ((1 - alpha) * loss).backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if stage == "cd":
            ema_update(self.m["ema_head"], student, s.ema_decay)
        else:
            fake, fopt = self.m["fake_head"].train(), self.opts["fake"]
            self.set_lr(fopt, k, n, s.fake_lr)
            for _ in range(s.fake_updates):
                floss, fstats = fake_score_loss(fake, x0_student, z, self.alpha_bar, self.cfg.x0_clip, s.vlb_weight)
                fopt.zero_grad(set_to_none=True)
                floss.backward()
                nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
                fopt.step()
            head_stats.update(fstats)
        return {"alpha": alpha, **stats, **head_stats}

    def start_distill_stage(self, stage: str) -> None:
        """CD starts the student (unless random) and its EMA from the teacher; DMD the fake-score head."""
        teacher = self.m["teacher_head"].state_dict()
        if stage == "cd" and self.s.student_init == "teacher":
            self.m["student_head"].load_state_dict(teacher)
        if stage == "cd":
            self.m["ema_head"].load_state_dict(self.m["student_head"].state_dict())
        if stage == "dmd":
            self.m["fake_head"].load_state_dict(teacher)
            self.m["ema_head"].load_state_dict(self.m["student_head"].state_dict())
        log.info("stage %s: student from %s", stage, self.s.student_init if stage == "cd" else "the previous stage")

    def step(self, step: int) -> dict:
        stage, k, n = self.s.stage_at(step)
        if stage == "teacher":
            return self.teacher_step(k, n)
        if stage == "draft":
            return self.draft_step(k, n)
        return self.distill_step(stage, k, n)

    def checkpoint(self, start: float, student_is_teacher: bool = False) -> FastARDiffCheckpoint:
        """The checkpoint so far (student_is_teacher: before any distillation, the student is a copy of the
        teacher head, so that the file is usable)."""
        self.ensure_frozen_target()
        cal = copy.deepcopy(self.calibration)
        shallow = entropy_statistics(self.m["draft"], self.split, self.cfg, "shallow", self.s.calibration_images)
        cal.draft_shallow_mean, cal.draft_shallow_std = shallow.mean().item(), shallow.std().item()
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.s).items()}
        meta = {"recipe": self.s.recipe, "family": "fast-ardiff", "settings": settings,
                "train_seconds": round(time.time() - start, 1), "torch": str(torch.__version__),
                "threads": torch.get_num_threads()}
        models = {k: copy.deepcopy(self.m[k]) for k in ("target", "draft", "teacher_head", "student_head")}
        if student_is_teacher:
            models["student_head"] = copy.deepcopy(self.m["teacher_head"])
            meta["student"] = "a copy of the teacher head (no distillation yet)"
        return FastARDiffCheckpoint(self.cfg, cal, **models, meta=meta).eval()

    def state(self, step: int, elapsed: float) -> dict:
        return {"format": RESUME_FORMAT, "step": step, "settings": dataclasses.asdict(self.s),
                "models": {k: m.state_dict() for k, m in self.m.items()},
                "opts": {k: o.state_dict() for k, o in self.opts.items()}, "sampler": self.sampler.state_dict(),
                "torch_rng": torch.get_rng_state(), "elapsed_seconds": elapsed,
                "calibration": self.calibration.to_dict() if self.calibration else None}

    def load_state(self, state: dict) -> int:
        for k, m in self.m.items():
            m.load_state_dict(state["models"][k])
        for k, o in self.opts.items():
            o.load_state_dict(state["opts"][k])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.calibration = Calibration.from_dict(state["calibration"]) if state["calibration"] else None
        return state["step"]


def train_fast_ardiff(out_dir: str | Path, s: FastARDiffTrainSettings, resume: bool = False, progress: bool = True,
                      stop_after: int | None = None, cache_dir: str | Path | None = None) -> Path:
    """Run (or resume) the recipe into out_dir; returns the final checkpoint's path (with stop_after: the state so
    far is saved and the checkpoint so far written)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FastardiffError(f"--out '{out_dir}' is a file; pass a directory for the training outputs")
    state_path = out_dir / RESUME_FILE
    if not resume and state_path.exists():
        raise FastardiffError(f"'{out_dir}' already holds a training run; pass --resume to continue it or "
                              "choose another --out")
    if resume and not state_path.exists():
        raise FastardiffError(f"--resume given but '{state_path}' does not exist; start without --resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = torch.load(state_path, map_location="cpu", weights_only=True) if resume else None
    if state is not None:
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise FastardiffError(f"'{state_path}' is not a fast-ardiff training state; delete it or start anew")
        saved = state["settings"]
        saved["stages"] = tuple(saved["stages"])
        s = FastARDiffTrainSettings(**saved)
    s.validate()
    start = time.time()
    trainer = Trainer(s, out_dir, Path(cache_dir) if cache_dir else out_dir)
    step = 0
    if state is not None:
        step = trainer.load_state(state)
        start -= state.get("elapsed_seconds", 0.0)
        log.info("resumed from %s at step %d", state_path, step)
    total = sum(s.stage_steps().values())
    end = total if stop_after is None else min(total, stop_after)
    bar = tqdm(total=total, initial=step, desc="train fast-ardiff", disable=not progress)
    while step < end:
        stage, k, n = s.stage_at(step)
        stats = trainer.step(step)
        step += 1
        bar.update(1)
        bar.set_postfix({"stage": stage, **{key: f"{v:.4f}" for key, v in stats.items()}})
        if step % s.save_every == 0 or step == end or k + 1 == n:
            atomic_torch_save(trainer.state(step, time.time() - start), state_path)
        if k + 1 == n and stage in ("teacher", "cd") and step < total:
            path = save_checkpoint(out_dir / f"after-{stage}.pt", trainer.checkpoint(start, stage == "teacher"))
            log.info("stage %s done: wrote %s", stage, path)
    bar.close()
    distilled = any(s.stage_steps()[k] for k in ("cd", "dmd")) or s.init
    path = save_checkpoint(out_dir / f"{trainer.cfg.name}.pt", trainer.checkpoint(start, not distilled))
    log.info("wrote %s", path)
    return path
