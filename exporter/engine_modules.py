"""The engines as torch modules with the engine-contract signature (DESIGN.md "Engines").

Every target (onnx, aoti, trt) and the `torch` reference backend trace or call exactly these modules, so the
contract lives in one place: names, shapes, dynamic axes and seeded example inputs.

`draft_rollout_<g>` (one engine per rollout length g = 1..gamma): the draft network unrolled g times in one
graph, so a draft round is one engine call instead of g. Inputs:
  tokens [R,K0,D], lengths [R]    the catch-up window ending at the last accepted token (K0 >= 1; rows whose
                                  cache is already valid recompute cached positions, as draft_step does)
  k_cache, v_cache [L,R,H,S,Dh]   the draft's cache; S leaves room for the g positions the rollout feeds
  cond [R]                        class ids: R = B rows, or 2B rows [cond; uncond] with guidance
  noise [B,g,D]                   standard normal, from the runtime's seeded RNG
  threshold [B]                   shallow-entropy early-stop threshold (-inf: never stop)
  max_drafts [B] int64            drafts allowed per sample (never past the image's end)
  temperature [1], cfg_scale [1]
Step i feeds the window plus drafts 0..i-1 (positions lengths .. lengths + K0 - 1 + i) after the cache
(exporter/rollout.py: how, and why two ways to unroll), guides z = z_u + s (z_c - z_u), sets sigma = T sigma(E_c) (drift-ar Eq. 6, calibration baked in)
and draws draft i = z + sigma * noise[:, i]. A sample's drafts end at the first step whose conditional
shallow-layer entropy is below its threshold (that draft is dropped) or at max_drafts. Outputs: drafts [B,g,D],
draft_mean [B,g,D], draft_sigma [B,g], num_drafts [B], shallow_entropy [B,g], new_k / new_v [L,R,H,K0+g-1,Dh]
(the keys/values of every fed position, written by the runtime at `lengths`).

`target_jacobi`: one speculative Jacobi round of the target in one graph (runtime/jacobi.py: the rule and the
host reference `resolve_slots`): target_verify over [last accepted token, G guesses] (tokens [R, G + 1, D];
the runtime never shifts this feed back) plus, in-graph, guidance,
sigma, the left-to-right acceptance of the guesses against their recorded q, maximal coupling of the later
guesses, fresh draws, and the residual max(0, p - q) by rejection over C proposals per slot. Extra inputs
(B samples, G guesses tested, W = window + 1 slots out, C residual proposals):
  guess_mean [B,G,D], guess_sigma [B,G]   the q each guess was drawn from; num_guesses [B] int64 (<= G)
  coins [B,G]                      uniforms: guess j passes (or keeps its coupling) when log(coin) < log p/q
  noise [B,W,D]                    standard normals for the fresh draws
  residual_noise [B,W,C,D], residual_coins [B,W,C]   the residual near the slot's old guess x
                                   (runtime/sampling.py reflected_residual): proposal 0 is x's mirror image (its
                                   noise unused), proposals 1.. are y = p + sigma * noise kept by the reflected
                                   rule; the first kept one is the sample
  temperature [1], cfg_scale [1], coupling [1] (1: maximal coupling, 0: independent guesses)
Outputs: accepted [B] int64, tokens_out [B,W,D] (the emitted token, then the next window's guesses),
slot_mean [B,W,D] / slot_sigma [B,W] (p at those slots: the guesses' recorded q), slot_entropy [B,G+1],
residual_miss [B,W] int64 (a residual slot none of its C proposals served: the runtime continues the same
rejection sampler there), new_k / new_v as target_verify.

In-place cache update (`--kv-update in-place`): draft_step, target_verify and target_jacobi also write new_k /
new_v into the input cache at each row's `lengths`. `onnx` (InBufferModel below, exporter/onnx_passes.py): one
cache buffer per layer in and out (runtime/engine.py per_layer_io), each layer scattering its new keys/values
into its buffer and attending over it, the outputs bound by the runtime to the input buffers (no copy of the
cache anywhere in the call); `aoti` (CacheUpdateInPlace below): a scatter_ into the cache inputs themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastardiff.recipes.config import DriftARConfig
from fastardiff.recipes.models import ARTransformer, DriftDecoder
from fastardiff.runtime.distribution import SigmaParams, sigma_from_entropy
from fastardiff.runtime.engine import IN_PLACE_ENGINES  # noqa: F401  (re-exported for the exporter)
from fastardiff.runtime.manifest import JACOBI_RESIDUAL

from .rollout import DraftRollout

AR_INPUTS = ["tokens", "lengths", "k_cache", "v_cache", "cond"]
ROLLOUT_INPUTS = AR_INPUTS + ["noise", "threshold", "max_drafts", "temperature", "cfg_scale"]
ROLLOUT_OUTPUTS = ["drafts", "draft_mean", "draft_sigma", "num_drafts", "shallow_entropy", "new_k", "new_v"]
JACOBI_INPUTS = AR_INPUTS + ["guess_mean", "guess_sigma", "num_guesses", "coins", "noise",
                             "residual_noise", "residual_coins", "temperature", "cfg_scale", "coupling"]
JACOBI_OUTPUTS = ["accepted", "tokens_out", "slot_mean", "slot_sigma", "slot_entropy", "residual_miss", "new_k",
                  "new_v"]
MAX_JACOBI_WINDOW = 16    # the longest Jacobi window a target_jacobi engine serves
MAX_ROLLOUT = 16   # the longest draft rollout an export may ask for


def rollout_name(gamma: int) -> str:
    return f"draft_rollout_{gamma}"


ENGINE_IO = {
    "draft_step": (AR_INPUTS, ["mean", "entropy", "shallow_entropy", "new_k", "new_v"]),
    "target_verify": (AR_INPUTS, ["mean", "entropy", "new_k", "new_v"]),
    "decoder": (["tokens", "entropy", "cond"], ["image"]),
    "target_jacobi": (JACOBI_INPUTS, JACOBI_OUTPUTS),
    # diffusion-head families (exporter/head_engines.py)
    "head_teacher": (["z", "traj_noise", "temperature"], ["mean", "sigma", "log_offset"]),
    "head_student": (["z", "traj_noise", "temperature"], ["mean", "sigma", "log_offset"]),
    **{rollout_name(g): (ROLLOUT_INPUTS, ROLLOUT_OUTPUTS) for g in range(1, MAX_ROLLOUT + 1)},
}
ROLLOUT_GAMMA = {rollout_name(g): g for g in range(1, MAX_ROLLOUT + 1)}   # engine name -> rollout length


class DraftStep(nn.Module):
    def __init__(self, draft: ARTransformer):
        super().__init__()
        self.model = draft

    def forward(self, tokens, lengths, k_cache, v_cache, cond):
        return self.model(tokens, lengths, k_cache, v_cache, cond)   # (+ the updated buffers: InBufferModel)


class TargetVerify(nn.Module):
    shallow_entropy = False       # no shallow entropy in its contract: the target computes the entropy layer's only

    def __init__(self, target: ARTransformer):
        super().__init__()
        self.model = target

    def forward(self, tokens, lengths, k_cache, v_cache, cond):
        mean, entropy, _, new_k, new_v, *buffers = self.model(tokens, lengths, k_cache, v_cache, cond,
                                                              shallow=self.shallow_entropy)
        return (mean, entropy, new_k, new_v, *buffers)


class TargetJacobi(nn.Module):
    """One Jacobi round in one graph (see the module docstring; runtime/jacobi.py `resolve_slots` is the same
    rule on the host, with the same meaning of every random input). The feed is [last accepted token, G guesses]
    (K = G + 1). Slot lookups are one-hot matrix products (exact: one 1.0 times a finite value plus zeros), so the
    sampling adds few nodes to the graph (on small graphs a call's cost follows its node count)."""
    shallow_entropy = False
    residual = JACOBI_RESIDUAL    # its residual rule, in its manifest entry (runtime/engine.py drop_stale_engines)

    def __init__(self, target: ARTransformer, sigma: SigmaParams):
        super().__init__()
        self.model = target
        self.sigma = sigma

    def forward(self, tokens, lengths, k_cache, v_cache, cond, guess_mean, guess_sigma, num_guesses, coins, noise,
                residual_noise, residual_coins, temperature, cfg_scale, coupling):
        mean, entropy, _, new_k, new_v, *buffers = self.model(tokens, lengths, k_cache, v_cache, cond,
                                                              shallow=self.shallow_entropy)
        return self.sample_round(mean, entropy, tokens, guess_mean, guess_sigma, num_guesses, coins, noise,
                                 residual_noise, residual_coins, temperature, cfg_scale, coupling) + (
            new_k, new_v, *buffers)

    def sample_round(self, mean, entropy, tokens, guess_mean, guess_sigma, num_guesses, coins, noise,
                     residual_noise, residual_coins, temperature, cfg_scale, coupling):
        """The round's sampling from the network's outputs: (accepted, tokens_out, slot_mean, slot_sigma,
        slot_entropy, residual_miss)."""
        samples, guesses, dim = guess_mean.shape
        rows, slots = tokens.shape[0], noise.shape[1]
        z = mean[rows - samples:] + cfg_scale * (mean[:samples] - mean[rows - samples:])   # guided [B, G + 1, D]
        e = entropy[:samples]
        s = sigma_from_entropy(e, self.sigma) * temperature
        x = tokens[:samples, 1:]                                                    # the guesses [B, G, D]
        log_ratio = (0.5 * (((x - guess_mean) ** 2).sum(-1) / guess_sigma ** 2
                            - ((x - z[:, :guesses]) ** 2).sum(-1) / s[:, :guesses] ** 2)
                     + dim * torch.log(guess_sigma / s[:, :guesses]))             # log p(x) - log q(x)
        k = num_guesses.unsqueeze(1)
        held = torch.arange(guesses, device=x.device).unsqueeze(0) < k
        fails = held & (torch.log(coins) >= log_ratio)
        accepted = (held & (torch.cumsum(fails.long(), 1) == 0)).long().sum(1)     # passes before the first fail
        slot = accepted.unsqueeze(1) + torch.arange(slots, device=x.device)         # [B, W] token slots a .. a+L
        # p at min(slot, k) (the last verified slot's p past the span); the guess and its q at min(slot, G - 1)
        pick_p = (torch.minimum(slot, k).unsqueeze(-1) == torch.arange(guesses + 1, device=x.device)).to(z.dtype)
        p_at = torch.matmul(pick_p, torch.cat([z, s.unsqueeze(-1)], -1))
        out_mean, out_sigma = p_at[..., :dim], p_at[..., dim]
        at = torch.clamp(slot, max=guesses - 1)
        pick_g = (at.unsqueeze(-1) == torch.arange(guesses, device=x.device)).to(z.dtype)
        g_at = torch.matmul(pick_g, torch.cat([x, guess_mean, guess_sigma.unsqueeze(-1),
                                               fails.to(z.dtype).unsqueeze(-1)], -1))
        x_at, q_mean, q_sigma, failed = g_at[..., :dim], g_at[..., dim:2 * dim], g_at[..., 2 * dim], g_at[..., -1]
        has_guess = slot < k
        coupled = coupling > 0
        keep = has_guess & (failed < 0.5) & coupled                 # a held slot at a is its first failure
        first = (torch.arange(slots, device=x.device) == 0).unsqueeze(0)
        residual = has_guess & ~keep & (coupled | first)            # independent: only the rejected slot
        # the residual near the old guess x (runtime/sampling.py reflected_residual): proposal 0 is its mirror image
        # y0 = mu_p + sigma_p z0, z0 = R e0 (x = mu_q + sigma_q e0), the others y = mu_p + sigma_p z from p. With
        # F(y) = 1 - min(1, q(y)/p(y)) and G(y) = 1 - min(1, p(x')/q(x')) at x' = g^-1(y) (= x for y0), y0 is kept
        # when coin * G < F, a later y when coin < F - G; both ratios from |z|^2, z.d and |d|^2, d = mu_q - mu_p
        d = q_mean - out_mean                                                      # [B, W, D]
        e0 = (x_at - q_mean) / q_sigma.unsqueeze(-1)
        dd = (d * d).sum(-1)
        z0 = e0 - (2 * (d * e0).sum(-1) / torch.clamp(dd, min=1e-30)).unsqueeze(-1) * d
        mirror = torch.arange(residual_noise.shape[2], device=x.device) == 0
        z = torch.where(mirror.unsqueeze(-1), z0.unsqueeze(2), residual_noise)      # [B, W, C, D]
        y = out_mean.unsqueeze(2) + out_sigma[..., None, None] * z
        zz, zd = (z * z).sum(-1), (z * d.unsqueeze(2)).sum(-1)
        ps, qs, dd = out_sigma.unsqueeze(-1), q_sigma.unsqueeze(-1), dd.unsqueeze(-1)
        log_width = dim * torch.log(ps / qs)                                       # log (sigma_p / sigma_q)^D
        log_q_over_p = (zz - (ps * ps * zz - 2 * ps * zd + dd) / (qs * qs)) / 2 + log_width          # at y
        log_p_over_q = (zz - (qs * qs * zz - 2 * qs * zd + dd) / (ps * ps)) / 2 - log_width          # at x'
        f = -torch.expm1(torch.clamp(log_q_over_p, max=0.0))
        g = -torch.expm1(torch.clamp(log_p_over_q, max=0.0))
        kept = (mirror & (residual_coins * g < f)) | (~mirror & (residual_coins < f - g))  # (no bool Where in ORT)
        first_kept = kept & (torch.cumsum(kept.long(), 2) == 1)
        from_residual = (first_kept.unsqueeze(-1).to(y.dtype) * y).sum(2)
        tokens_out = torch.where(keep.unsqueeze(-1), x_at,
                                 torch.where(residual.unsqueeze(-1), from_residual,
                                             out_mean + out_sigma.unsqueeze(-1) * noise))
        miss = residual & ~kept.any(2)
        return accepted, tokens_out, out_mean, out_sigma, e, miss.long()


class CacheUpdateInPlace(nn.Module):
    """`--kv-update in-place` for the aoti target: the wrapped AR engine also writes its new keys/values into the
    k_cache / v_cache it was given (scatter_ at each row's lengths, in place: AOTInductor keeps the mutation of a
    user input, so on the CPU the runtime's numpy buffer itself is updated). Outputs unchanged; the caches need
    room for the fed positions (the runtime's whole buffer has it). Named inputs (subclasses): torch.export maps
    the Dims by name."""

    def __init__(self, engine: nn.Module):
        super().__init__()
        self.engine = engine

    def run(self, *inputs):
        outputs = self.engine(*inputs)
        lengths, k_cache, v_cache = inputs[1:4]
        for cache, new in zip((k_cache, v_cache), outputs[-2:]):
            layers, rows, heads, fed, dim = new.shape
            index = (lengths.view(1, rows, 1, 1, 1) + torch.arange(fed, device=lengths.device).view(1, 1, 1, fed, 1))
            cache.scatter_(3, index.expand(layers, rows, heads, fed, dim), new.to(cache.dtype))
        return outputs


class ARCacheUpdateInPlace(CacheUpdateInPlace):
    def forward(self, tokens, lengths, k_cache, v_cache, cond):
        return self.run(tokens, lengths, k_cache, v_cache, cond)


class JacobiCacheUpdateInPlace(CacheUpdateInPlace):
    def forward(self, tokens, lengths, k_cache, v_cache, cond, guess_mean, guess_sigma, num_guesses, coins, noise,
                residual_noise, residual_coins, temperature, cfg_scale, coupling):
        return self.run(tokens, lengths, k_cache, v_cache, cond, guess_mean, guess_sigma, num_guesses, coins, noise,
                        residual_noise, residual_coins, temperature, cfg_scale, coupling)


class InBufferModel(nn.Module):
    """An ARTransformer run with in_buffer=True (recipes/models.py): k_cache / v_cache are tuples of per-layer
    buffers [R, H, S, Dh] with room for the fed positions; returns its outputs and then the updated buffers."""

    def __init__(self, model: ARTransformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, lengths, k_cache, v_cache, cond, shallow: bool = True):
        return self.model(tokens, lengths, k_cache, v_cache, cond, in_buffer=True, shallow=shallow)


def in_buffer_engine(name: str, engine: nn.Module) -> nn.Module:
    """AR engine `name` (one of IN_PLACE_ENGINES) over per-layer cache buffers it updates: the same module class
    around InBufferModel; its outputs are the contract's, then k_cache_out_0 .., v_cache_out_0 ..."""
    model = InBufferModel(engine.model)
    if name == "target_jacobi":
        return TargetJacobi(model, engine.sigma).eval()
    return {"draft_step": DraftStep, "target_verify": TargetVerify}[name](model).eval()


def per_layer_inputs(inputs: tuple) -> tuple:
    """Contract inputs (tokens, lengths, k_cache, v_cache, cond, ...) as an in_buffer engine takes them: the
    caches as tuples of per-layer buffers, every row's lengths leaving room for the K fed positions."""
    tokens, lengths, k_cache, v_cache, *rest = inputs
    lengths = torch.clamp(lengths, max=k_cache.shape[3] - tokens.shape[1])
    return (tokens, lengths, tuple(k_cache.unbind(0)), tuple(v_cache.unbind(0)), *rest)


def cache_update_in_place(name: str, engine: nn.Module) -> nn.Module:
    """The in-place wrapper of AR engine `name` (one of IN_PLACE_ENGINES)."""
    return (JacobiCacheUpdateInPlace if name == "target_jacobi" else ARCacheUpdateInPlace)(engine)


class Decoder(nn.Module):
    def __init__(self, decoder: DriftDecoder):
        super().__init__()
        self.model = decoder

    def forward(self, tokens, entropy, cond):
        return self.model(tokens, entropy, cond)


def make_engine_modules(target: ARTransformer, draft: ARTransformer, decoder: DriftDecoder,
                        rollout_sigma: SigmaParams | None = None, gammas=()) -> dict[str, nn.Module]:
    """The engines; `gammas` adds one draft_rollout engine per rollout length (needs the calibrated sigma)."""
    modules = {"draft_step": DraftStep(draft).eval(), "target_verify": TargetVerify(target).eval(),
               "decoder": Decoder(decoder).eval()}
    if rollout_sigma is not None:
        modules["target_jacobi"] = TargetJacobi(target, rollout_sigma).eval()
    for g in gammas:
        modules[rollout_name(g)] = DraftRollout(draft, g, rollout_sigma).eval()
    return modules


def rollout_capacity(cfg: DriftARConfig, gamma: int) -> int:
    """Cache positions a draft_rollout engine takes (static): the sequence plus room for gamma fed positions."""
    return cfg.seq_len + gamma


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max for each dynamic axis (TensorRT optimisation profile; ONNX/AOTI dynamic ranges)."""

    batch: tuple[int, int, int]
    new_tokens: tuple[int, int, int]   # K
    cache: tuple[int, int, int]        # S (cache length passed in)


def shape_profiles(cfg: DriftARConfig, max_batch: int, gamma: int) -> dict[str, ShapeProfile]:
    """Profiles of every engine an export writes: draft_step, target_verify, target_jacobi, decoder,
    draft_rollout_1..gamma.
    A rollout's cache axis is static (rollout_capacity for the export's largest gamma)."""
    cap = cfg.seq_len
    opt_b = max(1, max_batch // 2)
    profiles = {
        "draft_step": ShapeProfile((1, opt_b, max_batch), (1, 1, cap), (0, cap // 2, cap)),
        "target_verify": ShapeProfile((1, opt_b, max_batch), (1, gamma + 1, cap), (0, cap // 2, cap)),
        "decoder": ShapeProfile((1, opt_b, max_batch), (cfg.num_tokens,) * 3, (0, 0, 0)),
    }
    profiles["target_jacobi"] = ShapeProfile((1, opt_b, max_batch), (2, min(gamma, MAX_JACOBI_WINDOW) + 1, cap),
                                             (0, cap // 2, cap))
    full = (rollout_capacity(cfg, gamma),) * 3
    for g in range(1, gamma + 1):
        profiles[rollout_name(g)] = ShapeProfile((1, opt_b, max_batch), (1, 1, cap), full)
    return profiles


def example_inputs(cfg: DriftARConfig, name: str, model_layers: int, batch: int, new_tokens: int, cache: int,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs that respect the contract (lengths <= cache, lengths + K <= seq_len, some ragged)."""
    g = torch.Generator().manual_seed(seed)
    if name in ROLLOUT_GAMMA:
        return rollout_example_inputs(cfg, ROLLOUT_GAMMA[name], model_layers, batch, new_tokens, cache, g)
    if name == "target_jacobi":
        return jacobi_example_inputs(cfg, model_layers, batch, new_tokens, cache, g)
    if name.startswith("head_"):
        from .head_engines import head_example_inputs

        return head_example_inputs(cfg, name, batch, seed)
    if name == "decoder":
        return (torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=g),
                torch.rand(batch, cfg.num_tokens, generator=g),
                torch.randint(0, cfg.num_classes + 1, (batch,), generator=g))
    max_len = min(cache, cfg.seq_len - new_tokens)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len
    shape = (model_layers, batch, cfg.heads, cache, cfg.head_dim)
    return (torch.randn(batch, new_tokens, cfg.token_dim, generator=g), lengths.long(),
            torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.randint(0, cfg.num_classes + 1, (batch,), generator=g))


def rollout_example_inputs(cfg: DriftARConfig, gamma: int, layers: int, rows: int, new_tokens: int, cache: int,
                           g: torch.Generator, samples: int | None = None) -> tuple[torch.Tensor, ...]:
    """Contract-valid rollout inputs: `rows` cache rows for `samples` samples (default: even rows are the
    [cond; uncond] halves, guidance on), ragged lengths, a window of new_tokens, cache >= every fed position,
    thresholds that stop some samples early."""
    if samples is None:
        samples = rows // 2 if rows % 2 == 0 else rows
    new_tokens = max(1, min(new_tokens, cache - gamma + 1, cfg.seq_len - gamma))
    max_len = max(0, min(cache - new_tokens - gamma + 1, cfg.seq_len - new_tokens - gamma))
    lengths = torch.randint(0, max_len + 1, (samples,), generator=g)
    lengths[0] = max_len
    reps = rows // samples
    shape = (layers, rows, cfg.heads, cache, cfg.head_dim)
    tokens = torch.randn(samples, new_tokens, cfg.token_dim, generator=g)
    cond = torch.randint(0, cfg.num_classes, (samples,), generator=g)
    if reps == 2:
        cond = torch.cat([cond, torch.full_like(cond, cfg.num_classes)])
    threshold = torch.rand(samples, generator=g)
    threshold[0] = -float("inf")
    max_drafts = torch.randint(0, gamma + 1, (samples,), generator=g)
    max_drafts[0] = gamma
    return (tokens.repeat(reps, 1, 1), lengths.repeat(reps).long(), torch.randn(shape, generator=g),
            torch.randn(shape, generator=g), cond.long(), torch.randn(samples, gamma, cfg.token_dim, generator=g),
            threshold, max_drafts.long(), torch.tensor([0.8]), torch.tensor([1.5 if reps == 2 else 1.0]))


def jacobi_example_inputs(cfg: DriftARConfig, layers: int, rows: int, new_tokens: int, cache: int,
                          g: torch.Generator, samples: int | None = None, window: int | None = None,
                          proposals: int = 3) -> tuple[torch.Tensor, ...]:
    """Contract-valid target_jacobi inputs: `rows` cache rows for `samples` samples (default: the [cond; uncond]
    halves when rows is even), K = new_tokens >= 2 fed tokens (G = K - 1 guesses, ragged counts), ragged lengths
    with lengths + K <= seq_len, a window of `window` slots out (default K + 1), guesses near their q."""
    if samples is None:
        samples = rows // 2 if rows % 2 == 0 else rows
    reps = rows // samples
    new_tokens = max(2, min(new_tokens, cfg.seq_len - 1))
    guesses = new_tokens - 1
    slots = (window or guesses + 1) + 1
    max_len = max(0, min(cache, cfg.seq_len - new_tokens))
    lengths = torch.randint(0, max_len + 1, (samples,), generator=g)
    lengths[0] = max_len
    shape = (layers, rows, cfg.heads, cache, cfg.head_dim)
    guess_mean = torch.randn(samples, guesses, cfg.token_dim, generator=g)
    guess_sigma = 0.05 + 0.5 * torch.rand(samples, guesses, generator=g)
    tokens = torch.randn(samples, new_tokens, cfg.token_dim, generator=g)
    tokens[:, 1:] = guess_mean + guess_sigma.unsqueeze(-1) * torch.randn(guess_mean.shape, generator=g)
    cond = torch.randint(0, cfg.num_classes, (samples,), generator=g)
    if reps == 2:
        cond = torch.cat([cond, torch.full_like(cond, cfg.num_classes)])
    num_guesses = torch.randint(1, guesses + 1, (samples,), generator=g)
    num_guesses[0] = guesses
    return (tokens.repeat(reps, 1, 1), lengths.repeat(reps).long(), torch.randn(shape, generator=g),
            torch.randn(shape, generator=g), cond.long(), guess_mean,
            guess_sigma, num_guesses.long(), torch.rand(samples, guesses, generator=g),
            torch.randn(samples, slots, cfg.token_dim, generator=g),
            torch.randn(samples, slots, proposals, cfg.token_dim, generator=g),
            torch.rand(samples, slots, proposals, generator=g), torch.tensor([0.8]),
            torch.tensor([1.5 if reps == 2 else 1.0]), torch.tensor([1.0]))
