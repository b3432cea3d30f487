"""fast-ardiff recipes: the head's sampler against an independent DDPM reference, shapes, the checkpoint's family
dispatch, and a few steps of every training stage (tiny-mnist-fast-ardiff-small, random or few-step weights)."""
from __future__ import annotations

import math

import pytest
import torch

from fastardiff.errors import CheckpointError, FastardiffError
from fastardiff.recipes.checkpoint import load_checkpoint
from fastardiff.recipes.config import Calibration, get_config
from fastardiff.recipes.fast_ardiff import (DiffusionHead, FastARDiffCheckpoint, FastARDiffConfig,
                                            build_fast_ardiff_models, cosine_alpha_bar, final_step, sample_target_only,
                                            save_checkpoint, step_schedule)

SMALL = "tiny-mnist-fast-ardiff-small"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_head(cfg, seed=0, scale=0.3):
    """A head with every weight random (the zero-initialised output and modulations too), so eps and v vary."""
    torch.manual_seed(seed)
    head = DiffusionHead(cfg).double()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return head.eval()


def reference_ddpm(head, z, noise, T, x0_clip, temperature):
    """Improved DDPM's ancestral sampler written from its paper, step t -> t-1 for t = T..1, with betas from the
    cosine alpha_bar function (clipped at 0.999), alpha_t = 1 - beta_t, posterior coefficients
    beta_t sqrt(ab_{t-1}) / (1 - ab_t) and (1 - ab_{t-1}) sqrt(alpha_t) / (1 - ab_t), clipped log variance
    (posterior_variance[1] at t = 1). Returns the last Gaussian's (mean, sigma) and -D sum log sigma before it."""
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]  # betas[t-1] = beta_t
    alphas_cumprod, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        alphas_cumprod.append(acc)
    prev = [1.0] + alphas_cumprod[:-1]
    post_var = [b * (1 - p) / (1 - a) for b, p, a in zip(betas, prev, alphas_cumprod)]
    post_log_var_clipped = [math.log(post_var[1])] + [math.log(v) for v in post_var[1:]]
    D = noise.shape[-1]
    x = noise[:, 0]
    log_offset = torch.zeros(x.shape[0], dtype=x.dtype)
    for i, t in enumerate(range(T, 0, -1)):
        k = t - 1
        eps, v = head(x, torch.full((x.shape[0],), t / T, dtype=x.dtype), z)
        x0 = (x / math.sqrt(alphas_cumprod[k]) - math.sqrt(1 / alphas_cumprod[k] - 1) * eps).clamp(-x0_clip, x0_clip)
        c1 = betas[k] * math.sqrt(prev[k]) / (1 - alphas_cumprod[k])
        c2 = (1 - prev[k]) * math.sqrt(1 - betas[k]) / (1 - alphas_cumprod[k])
        mean = c1 * x0 + c2 * x
        log_var = v * math.log(betas[k]) + (1 - v) * post_log_var_clipped[k]
        sigma = temperature * torch.exp(0.5 * log_var)
        if t == 1:
            return mean, sigma, log_offset
        x = mean + sigma.unsqueeze(-1) * noise[:, i + 1]
        log_offset = log_offset - D * torch.log(sigma)


@pytest.mark.parametrize("x0_clip,temperature", [(1e6, 1.0), (1.0, 0.8)])
def test_teacher_final_step_matches_an_independent_ddpm_sampler(x0_clip, temperature):
    cfg = get_config(SMALL)
    T = cfg.teacher_steps
    head = random_head(cfg)
    head.x0_clip = x0_clip
    M = 7
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(M, cfg.z_dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(M, T, cfg.token_dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        mean, sigma, off = final_step(head, z, noise, step_schedule(T, T), cosine_alpha_bar(T), temperature)
        ref_mean, ref_sigma, ref_off = reference_ddpm(head, z, noise, T, x0_clip, temperature)
    assert torch.allclose(mean, ref_mean, rtol=1e-9, atol=1e-9)
    assert torch.allclose(sigma, ref_sigma, rtol=1e-9)
    assert torch.allclose(off, ref_off, rtol=1e-9)
    assert (sigma > 0).all()


def test_unclipped_posterior_mean_is_ddpm_eps_form():
    """For a one-step jump t -> t-1 without clipping, the posterior mean is 1/sqrt(alpha_t) (x - beta_t/sqrt(1-ab_t) eps)."""
    from fastardiff.recipes.diffusion_head import head_jump, variance_floor

    cfg = get_config(SMALL)
    head = random_head(cfg)
    ab = cosine_alpha_bar(cfg.teacher_steps)
    x, z = torch.randn(5, cfg.token_dim, dtype=torch.float64), torch.randn(5, cfg.z_dim, dtype=torch.float64)
    for t in (cfg.teacher_steps, 5, 2):
        mean, _, _ = head_jump(head, x, z, t, t - 1, cfg.teacher_steps, ab, 1e9, variance_floor(ab))
        eps, _ = head(x, torch.full((5,), t / cfg.teacher_steps, dtype=torch.float64), z)
        beta = 1 - ab[t] / ab[t - 1]
        assert torch.allclose(mean, (x - beta / (1 - ab[t]).sqrt() * eps) / (1 - beta).sqrt(), atol=1e-9)


def test_schedule_and_steps():
    ab = cosine_alpha_bar(100)
    assert ab.shape == (101,) and ab[0] == 1 and (ab[1:] < ab[:-1]).all()
    betas = 1 - ab[1:] / ab[:-1]
    assert betas.max() <= 0.999 + 1e-12
    assert step_schedule(100, 3) == [100, 67, 33]
    assert step_schedule(10, 10) == list(range(10, 0, -1))
    assert step_schedule(10, 2) == [10, 5]


def test_shapes_and_student_final_step():
    cfg = get_config(SMALL)
    assert isinstance(cfg, FastARDiffConfig) and cfg.family == "fast-ardiff" and cfg.ar_out_dim == cfg.z_dim
    assert isinstance(get_config("tiny-mnist-fast-ardiff"), FastARDiffConfig)
    target, draft, teacher, student = build_fast_ardiff_models(cfg)
    tokens = torch.randn(3, cfg.num_tokens, cfg.token_dim)
    z, entropy, shallow = target.forward_sequence(tokens, torch.tensor([0, 1, cfg.num_classes]))
    assert z.shape == (3, cfg.num_tokens, cfg.z_dim) and entropy.shape == (3, cfg.num_tokens)
    M = 6
    eps, v = teacher(torch.randn(M, cfg.token_dim), torch.rand(M), torch.randn(M, cfg.z_dim))
    assert eps.shape == (M, cfg.token_dim) and v.shape == (M,) and ((v >= 0) & (v <= 1)).all()
    steps = step_schedule(cfg.teacher_steps, cfg.student_steps)
    noise = torch.randn(M, len(steps), cfg.token_dim)
    head = random_head(cfg, scale=0.1).float()
    z1, z2 = torch.randn(2, M, cfg.z_dim, generator=torch.Generator().manual_seed(5))
    out = final_step(head, z1, noise, steps, cosine_alpha_bar(10), 1.0)
    again = final_step(head, z2, noise, steps, cosine_alpha_bar(10), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(out, final_step(head, z1, noise, steps, cosine_alpha_bar(10), 1.0)))
    assert [o.shape for o in out] == [(M, cfg.token_dim), (M,), (M,)]
    assert all(torch.isfinite(o).all() for o in out) and (out[1] > 0).all()
    assert not torch.equal(out[0], again[0])  # z differs
    with pytest.raises(CheckpointError, match="student_steps"):
        FastARDiffConfig(student_steps=5).validate()


def small_checkpoint(seed=0) -> FastARDiffCheckpoint:
    torch.manual_seed(seed)
    cfg = get_config(SMALL)
    return FastARDiffCheckpoint(cfg, Calibration(), *build_fast_ardiff_models(cfg), meta={"test": True}).eval()


def test_checkpoint_round_trip_and_family_dispatch(tmp_path, shipped_checkpoint_path):
    ckpt = small_checkpoint()
    path = save_checkpoint(tmp_path / "fa.pt", ckpt)
    assert path.with_suffix(".json").exists()
    payload = torch.load(path, weights_only=True)
    assert payload["family"] == "fast-ardiff"
    loaded = load_checkpoint(path)
    assert isinstance(loaded, FastARDiffCheckpoint) and loaded.config == ckpt.config and loaded.meta == {"test": True}
    for name, module in ckpt.modules().items():
        for (k, a), (_, b) in zip(module.state_dict().items(), loaded.modules()[name].state_dict().items()):
            assert torch.equal(a, b), (name, k)
    labels = torch.tensor([3, 7])
    a = sample_target_only(ckpt, labels, "student", 1.5, 1.0, torch.Generator().manual_seed(0))
    b = sample_target_only(loaded, labels, "student", 1.5, 1.0, torch.Generator().manual_seed(0))
    assert a.shape == (2, ckpt.config.num_tokens, ckpt.config.token_dim) and torch.equal(a, b)
    drift = load_checkpoint(shipped_checkpoint_path)
    assert type(drift).__name__ == "DriftARCheckpoint" and drift.config.family == "drift-ar"
    wrong = tmp_path / "wrong.pt"
    torch.save({**payload, "family": "no-such-family"}, wrong)
    with pytest.raises(CheckpointError, match="unknown model family 'no-such-family'"):
        load_checkpoint(wrong)
    mixed = tmp_path / "mixed.pt"
    torch.save({**torch.load(shipped_checkpoint_path, weights_only=True), "family": "fast-ardiff"}, mixed)
    with pytest.raises(CheckpointError, match="model family 'fast-ardiff'"):
        load_checkpoint(mixed)


def test_cspd_acceptance_estimate_is_one_for_a_draft_equal_to_the_target():
    from fastardiff.recipes.evaluate import estimate_cspd_acceptance

    ckpt = small_checkpoint()
    ckpt.draft = ckpt.target
    ckpt.student_head.load_state_dict(random_head(ckpt.config).float().state_dict())
    labels = torch.arange(4)
    tokens = sample_target_only(ckpt, labels, "student", generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    assert estimate_cspd_acceptance(ckpt, tokens, labels, draws=2, generator=gen) == pytest.approx(1.0)
    independent = estimate_cspd_acceptance(ckpt, tokens, labels, shared_noise=False, draws=2, generator=gen)
    assert 0 < independent < 1


def test_distillation_losses_are_finite_and_reduce():
    from fastardiff.recipes.head_distill import consistency_loss, dmd_loss, fake_score_loss

    cfg = get_config(SMALL)
    torch.manual_seed(0)
    teacher, student = random_head(cfg, scale=0.1).float(), random_head(cfg, 1, scale=0.1).float()
    fake = random_head(cfg, 2, scale=0.1).float()
    ab = cosine_alpha_bar(cfg.teacher_steps)
    x0, z = torch.rand(64, cfg.token_dim) * 2 - 1, torch.randn(64, cfg.z_dim)
    steps = step_schedule(cfg.teacher_steps, cfg.student_steps)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, stats = consistency_loss(student, student, teacher, x0, z, ab, 3, cfg.x0_clip,
                                       generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["cd"])
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    loss, sample, stats = dmd_loss(student, teacher, fake, z, steps, ab, 16, cfg.x0_clip)
    loss.backward()
    assert math.isfinite(loss.item()) and sample.shape == x0.shape
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    floss, fstats = fake_score_loss(fake, sample, z, ab, cfg.x0_clip, 0.01)
    assert math.isfinite(floss.item()) and "fake_eps_mse" in fstats


def test_every_training_stage_runs_and_resumes(tmp_path):
    from fastardiff.recipes.train_fast_ardiff import FastARDiffTrainSettings, train_fast_ardiff

    s = FastARDiffTrainSettings(recipe=SMALL, teacher_steps=6, draft_steps=2, cd_steps=2, dmd_steps=2,
                                batch_images=4, distill_images=2, calibration_images=20, save_every=3, train_blocks=1,
                                train_images=40)
    out = tmp_path / "run"
    train_fast_ardiff(out, s, progress=False, stop_after=8)
    state = torch.load(out / "resume-state.pt", weights_only=True)
    assert state["step"] == 8 and (out / "after-teacher.pt").exists()
    with pytest.raises(FastardiffError, match="--resume"):
        train_fast_ardiff(out, s, progress=False)
    path = train_fast_ardiff(out, s, resume=True, progress=False)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, FastARDiffCheckpoint) and (out / "after-cd.pt").exists()
    assert ckpt.meta["settings"]["dmd_steps"] == 2
    # resuming reproduces the uninterrupted run exactly
    straight = train_fast_ardiff(tmp_path / "straight", s, progress=False)
    again = load_checkpoint(straight)
    for name, module in ckpt.modules().items():
        for (k, a), (_, b) in zip(module.state_dict().items(), again.modules()[name].state_dict().items()):
            assert torch.allclose(a, b, atol=1e-6), (name, k)


def test_teacher_stage_decreases_the_loss():
    from fastardiff.recipes.diffusion_head import hybrid_loss

    cfg = get_config(SMALL)
    torch.manual_seed(0)
    head = DiffusionHead(cfg)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    x0 = (torch.rand(256, cfg.token_dim) > 0.5).float() * 2 - 1
    z = torch.randn(256, cfg.z_dim)
    ab = cosine_alpha_bar(cfg.teacher_steps)
    first = last = None
    for i in range(60):
        loss, stats = hybrid_loss(head, x0, z, ab, cfg.x0_clip, 0.01, torch.Generator().manual_seed(i % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = stats["eps_mse"] if first is None else first
        last = stats["eps_mse"]
    assert math.isfinite(last) and last < first
