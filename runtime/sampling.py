"""Token sampling for the speculative loop: Gaussian tokens N(z, (sigma(E) * temperature)^2 I), classifier-free
guidance, and the exact speculative acceptance rule, all vectorised over the batch with a numpy Generator.

Exactness (why speculative output == target-only output in distribution): the draft proposes x ~ q, which is
kept with probability min(1, p(x)/q(x)); at the first rejection a replacement is drawn from the residual
r(x) = max(0, p(x) - q(x)) / Z, Z = TV(p, q). Then P(out in A) = int_A min(p, q) + Z r(A) = p(A). The residual is
sampled by rejection from p (propose y ~ p, keep with probability 1 - min(1, q(y)/p(y))), which accepts each
proposal with probability Z. The loop runs in growing vectorised chunks up to `max_proposals` per sample; the
rejection branch is entered with probability Z and then runs out of proposals with probability (1-Z)^C, so the
product is at most 1/(e C) per token (C = max_proposals, default 2^22: below 1e-7). Only in that event is the
fallback used (the proposal with the largest residual weight, logged as a warning): the output's total
variation distance from p is bounded by that probability. Nothing ever returns zeros or an unfilled slot.
`reflected_residual` draws the same residual law from the rejected draft itself (its mirror image across the
midplane of p and q, then the same rejection loop with a corrected rule; its entry and exit odds are the same
product): Jacobi decoding uses it so that a replaced guess stays near the one the later slots were conditioned on.

Diagonal covariances (the foreign-gaussian family: N(mean, diag(sigma^2)), sigma [..., D] instead of [...]): every
function here takes either form (`per_dimension`). The acceptance test and the rejection-from-p residual are exact
for any densities. The reflected residual stays exact by whitening with each Gaussian's own per-dimension scale:
g(x) = mu_p + sigma_p * R((x - mu_q) / sigma_q), R the reflection across the hyperplane normal to
u = (mu_q - mu_p) / sqrt(sigma_p sigma_q), pushes q onto p for any R (R preserves N(0, I)), and its correction
rule (r(y) / h(y) = (1 - q(y)/p(y))+ / (1 - p(x')/q(x'))+, x' = g^-1(y)) holds for any map pushing q onto p; with
equal isotropic widths it is the isotropic rule's mirror image.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from .distribution import SigmaParams, sigma_from_entropy

log = logging.getLogger(__name__)

MAX_PROPOSALS = 1 << 22
# CSpD's approximate rule (TokenDistribution.log_offset): its residual can be empty, so fewer proposals before the
# fallback, which is then a sample of the target's final-step Gaussian p (never zeros)
APPROX_MAX_PROPOSALS = 1 << 12
MAX_CHUNK = 1 << 13
FIRST_CHUNK = 16
# the reflected second stage keeps a proposal with probability TV(p, q) TV(h, r) (a few % on the shipped model):
# one chunk of this many proposals serves nearly every row in one pass
REFLECTED_FIRST_CHUNK = 64


def per_dimension(sigma, like) -> bool:
    """Whether `sigma` is a per-dimension (diagonal) scale of the tokens `like` [..., D]: one axis more than an
    isotropic scale has."""
    return np.ndim(sigma) == np.ndim(like)


def scale_of(sigma, like):
    """sigma broadcastable against `like` [..., D]: as it is when diagonal, with a trailing axis when isotropic."""
    return sigma if per_dimension(sigma, like) else sigma[..., None]


def reflect(z, u):
    """z reflected across the hyperplane normal to u (both [..., D]); z itself where u == 0."""
    uu = np.add.reduce(u * u, axis=-1)
    along = np.divide(2 * np.add.reduce(z * u, axis=-1), uu, out=np.zeros(np.broadcast_shapes(uu.shape, z.shape[:-1])),
                      where=uu > 0)
    return z - along[..., None] * u


class TokenDistribution(NamedTuple):
    """N(mean, sigma^2 I) per token: mean [..., D], sigma [...] (or [..., D]: N(mean, diag(sigma^2)), the
    foreign-gaussian family), entropy [...] (the entropy that set sigma).
    log_offset [...] (None: 0) is added to the token's log-density in the acceptance test: a diffusion-head family
    (runtime/token_rules.py) scores its final-step Gaussian times prod_t sigma_t^-D of its earlier steps (CSpD)."""

    mean: np.ndarray
    sigma: np.ndarray
    entropy: np.ndarray
    log_offset: np.ndarray | None = None


def offset_shift(p: TokenDistribution, q: TokenDistribution, slots) -> np.ndarray | float:
    """log_offset_p - log_offset_q at p's `slots` (q's own slots): 0.0 for plain Gaussian tokens."""
    if p.log_offset is None and q.log_offset is None:
        return 0.0
    p_off = 0.0 if p.log_offset is None else p.log_offset[slots]
    q_off = 0.0 if q.log_offset is None else q.log_offset
    return p_off - q_off


def guide(mean: np.ndarray, entropy: np.ndarray, cfg_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Classifier-free guidance on an engine batch of 2B rows [cond; uncond]: z = z_u + s (z_c - z_u).
    The entropy (hence sigma) is the conditional half's. With cfg_scale == 1 the batch is B rows, unchanged."""
    if cfg_scale == 1.0:
        return mean, entropy
    half = mean.shape[0] // 2
    cond, uncond = mean[:half], mean[half:]
    return uncond + cfg_scale * (cond - uncond), entropy[:half]


def token_distribution(mean, entropy, sigma_params: SigmaParams, temperature: float) -> TokenDistribution:
    """numpy arrays, or torch tensors on the device loop (runtime/arrays.py): the same float64 formula."""
    if isinstance(mean, np.ndarray):
        mean, wide = mean.astype(np.float64), entropy.astype(np.float64)
    else:
        mean, wide = mean.double(), entropy.double()
    sigma = sigma_from_entropy(wide, sigma_params)
    if temperature != 1.0:  # x * 1.0 == x: skipped, not approximated
        sigma = sigma * temperature
    return TokenDistribution(mean, sigma, entropy)


def sample_gaussian(rng: np.random.Generator, mean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return mean + scale_of(sigma, mean) * rng.standard_normal(mean.shape)


def log_density(x: np.ndarray, mean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """log N(x; mean, sigma^2 I) summed over the last axis, in float64."""
    d = x.shape[-1]
    if per_dimension(sigma, x):
        return (-0.5 * np.add.reduce(((x - mean) / sigma) ** 2, axis=-1)
                - np.add.reduce(np.log(np.broadcast_to(sigma, x.shape)), axis=-1) - 0.5 * d * math.log(2 * math.pi))
    sq = np.add.reduce((x - mean) ** 2, axis=-1)  # = np.sum without its Python wrapper
    return -0.5 * sq / sigma**2 - d * np.log(sigma) - 0.5 * d * math.log(2 * math.pi)


def log_density_ratio(x: np.ndarray, a_mean, a_sigma, b_mean, b_sigma, inner_temperature: float = 1.0) -> np.ndarray:
    """log a(x) - log b(x) for a = N(a_mean, a_sigma^2 I), b = N(b_mean, b_sigma^2 I), in float64: the same value
    as log_density(x, a) - log_density(x, b), with the shared 2*pi terms cancelled exactly (fewer operations).
    inner_temperature != 1 divides the quadratic terms by its square (CSpD's tempered ratio; not a density ratio)."""
    d = x.shape[-1]
    if per_dimension(a_sigma, x) or per_dimension(b_sigma, x):      # diagonal covariances
        a_s, b_s = scale_of(a_sigma, x), scale_of(b_sigma, x)
        quadratic = 0.5 * (np.add.reduce(((x - b_mean) / b_s) ** 2, axis=-1)
                           - np.add.reduce(((x - a_mean) / a_s) ** 2, axis=-1))
        if inner_temperature != 1.0:
            quadratic = quadratic / inner_temperature ** 2
        return quadratic + np.add.reduce(np.log(np.broadcast_to(b_s / a_s, x.shape)), axis=-1)
    a = np.add.reduce((x - a_mean) ** 2, axis=-1)
    b = np.add.reduce((x - b_mean) ** 2, axis=-1)
    quadratic = 0.5 * (b / b_sigma**2 - a / a_sigma**2)
    if inner_temperature != 1.0:
        quadratic = quadratic / inner_temperature ** 2
    return quadratic + d * np.log(b_sigma / a_sigma)


def sample_residual(rng: np.random.Generator, p_mean, p_sigma, q_mean, q_sigma,
                    max_proposals: int = MAX_PROPOSALS, shift=0.0, reflected: bool = False) -> np.ndarray:
    """One sample per row from max(0, p - q) (normalised), by rejection from p. Rows: p_mean [R, D], p_sigma [R].
    shift [R] (log_offset_p - log_offset_q) scores p as exp(shift) p: the residual max(0, exp(shift) p - q).
    reflected=True: the second stage of `reflected_residual` (its proposals from p are kept with probability
    (1 - q/p)+ - (1 - p/q)+ at the reflected point, see there)."""
    rows, dim = p_mean.shape
    shift = np.broadcast_to(np.asarray(shift, np.float64), (rows,))
    if reflected and shift.any():
        raise ValueError("the reflected residual is defined for plain Gaussian tokens (no log_offset shift)")
    # fast path (the usual case): one chunk of proposals per row, few array operations; a row is kept with
    # probability 1 - (1 - Z)^chunk here
    chunk = REFLECTED_FIRST_CHUNK if reflected else FIRST_CHUNK
    z = rng.standard_normal((rows, chunk, dim))
    f, g = residual_ratios(z, p_mean[:, None], p_sigma[:, None], q_mean[:, None], q_sigma[:, None], shift[:, None],
                           reflected)
    kept = rng.random(f.shape) < f - g
    hit = kept.any(axis=1)
    first = kept.argmax(axis=1)
    out = p_mean + scale_of(p_sigma, p_mean) * z[np.arange(rows), first]
    if hit.all():
        return out
    miss = np.flatnonzero(~hit)
    out[miss] = _sample_residual_loop(rng, p_mean[miss], p_sigma[miss], q_mean[miss], q_sigma[miss],
                                      max(max_proposals - chunk, 1), shift[miss], reflected)
    return out


def residual_ratios(z, p_mean, p_sigma, q_mean, q_sigma, shift=0.0, reflected: bool = False):
    """(f, g) of the proposals y = p_mean + p_sigma z [T, C, D] (p_mean, q_mean [T, 1, D], p_sigma, q_sigma,
    shift [T, 1]): f = 1 - min(1, q(y)/p(y)) (with |y - mu_p|^2 / sigma_p^2 = |z|^2), and with `reflected`
    g = 1 - min(1, p(x')/q(x')) at x' = mu_q + sigma_q R z, the point the mirror map of reflected_residual sends to
    y, where |x' - mu_q|^2 / sigma_q^2 = |z|^2 and |x' - mu_p|^2 = |d|^2 - 2 sigma_q d.z + sigma_q^2 |z|^2,
    d = mu_q - mu_p (g = 0 without). The plain residual sampler keeps y with probability f, the reflected one's
    second stage with f - g, and its mirror image (z = R e0, x' = the rejected x) when coin * g < f: the same
    formulas as the target_jacobi graph's."""
    d = q_mean - p_mean
    if per_dimension(p_sigma, z):
        return _diagonal_residual_ratios(z, d, p_sigma, q_sigma, shift, reflected)
    zz, dz, dd = (np.add.reduce(a * b, axis=-1) for a, b in ((z, z), (z, d), (d, d)))     # [T, C], [T, C], [T, 1]
    log_width = z.shape[-1] * np.log(p_sigma / q_sigma)                          # log (sigma_p / sigma_q)^D
    # |y - mu_q|^2 = sigma_p^2 |z|^2 - 2 sigma_p z.d + |d|^2: no proposal y is formed (few array operations)
    log_q_over_p = 0.5 * (zz - (p_sigma**2 * zz - 2 * p_sigma * dz + dd) / q_sigma**2) + log_width - shift
    f = -np.expm1(np.minimum(log_q_over_p, 0.0))
    if not reflected:
        return f, 0.0
    log_p_over_q = 0.5 * (zz - (dd - 2 * q_sigma * dz + q_sigma**2 * zz) / p_sigma**2) - log_width   # at g^-1(y)
    return f, -np.expm1(np.minimum(log_p_over_q, 0.0))


def _diagonal_residual_ratios(z, d, p_sigma, q_sigma, shift, reflected: bool):
    """residual_ratios for diagonal scales p_sigma, q_sigma [T, 1, D]: y = mu_p + sigma_p z, and with `reflected`
    x' = mu_q + sigma_q R z (R: the reflection of the whitened mirror map, module docstring)."""
    zz = np.add.reduce(z * z, axis=-1)
    log_width = np.add.reduce(np.log(p_sigma / q_sigma), axis=-1)                # log prod (sigma_p / sigma_q)
    log_q_over_p = 0.5 * (zz - np.add.reduce(((p_sigma * z - d) / q_sigma) ** 2, axis=-1)) + log_width - shift
    f = -np.expm1(np.minimum(log_q_over_p, 0.0))
    if not reflected:
        return f, 0.0
    rz = reflect(z, d / np.sqrt(p_sigma * q_sigma))
    log_p_over_q = 0.5 * (zz - np.add.reduce(((q_sigma * rz + d) / p_sigma) ** 2, axis=-1)) - log_width
    return f, -np.expm1(np.minimum(log_p_over_q, 0.0))


def reflected_residual(rng: np.random.Generator, x, p_mean, p_sigma, q_mean, q_sigma,
                       max_proposals: int = MAX_PROPOSALS) -> np.ndarray:
    """One sample per row from the residual max(0, p - q) (normalised), close to x [R, D]: a draw from q that the
    acceptance test rejected (or a coupled guess it did not keep), so x follows s = max(0, q - p) / Z.

    Reflection coupling (the maximal coupling of Jacob, O'Leary & Atchade, 2020, applied to s and the residual):
    g(x) = mu_p + (sigma_p / sigma_q) R (x - mu_q), with R the reflection across the hyperplane normal to
    mu_p - mu_q, maps q onto p, and s onto the residual exactly when sigma_p == sigma_q. Its first proposal
    y0 = g(x) is kept with probability min(1, r(y0) / h(y0)), h = g#s the law of y0, which reduces to
    (1 - q(y0)/p(y0))+ / (1 - p(x)/q(x)) (1 for equal widths); else proposals y ~ p are kept with probability
    (r(y) - h(y))+ / p(y) = (1 - q(y)/p(y))+ - (1 - p(x')/q(x'))+, x' = g^-1(y) (sample_residual, reflected).
    The sample follows the residual exactly, as the independent sampler's does, and lies near x (a mirror image
    across the midplane instead of an independent draw), so the slots the verify computed after x still see
    nearly the token they were conditioned on: the Jacobi loop's next guesses there pass more often."""
    rows = len(x)
    d = q_mean - p_mean
    e0 = (x - q_mean) / scale_of(q_sigma, x)                    # x = mu_q + sigma_q e0
    if per_dimension(p_sigma, x):                               # diagonal: the whitened mirror (module docstring)
        z0 = reflect(e0, d / np.sqrt(p_sigma * q_sigma))
    else:
        dd = np.add.reduce(d * d, axis=-1)
        mirror = np.divide(2 * np.add.reduce(e0 * d, axis=-1), dd, out=np.zeros(rows), where=dd > 0)
        z0 = e0 - mirror[:, None] * d                           # R e0: y0 = mu_p + sigma_p z0, g^-1(y0) = x
    f, g = residual_ratios(z0[:, None], p_mean[:, None], p_sigma[:, None], q_mean[:, None], q_sigma[:, None],
                           reflected=True)
    keep = rng.random(rows) * g[:, 0] < f[:, 0]
    y0 = p_mean + scale_of(p_sigma, p_mean) * z0
    miss = np.flatnonzero(~keep)
    if miss.size:
        y0[miss] = sample_residual(rng, p_mean[miss], p_sigma[miss], q_mean[miss], q_sigma[miss], max_proposals,
                                   reflected=True)
    return y0


def _sample_residual_loop(rng: np.random.Generator, p_mean, p_sigma, q_mean, q_sigma, max_proposals: int,
                          shift: np.ndarray, reflected: bool = False):
    """sample_residual for the rows its first chunk missed (p close to q): growing chunks, with the fallback."""
    rows, dim = p_mean.shape
    out = np.empty((rows, dim))
    best = sample_gaussian(rng, p_mean, p_sigma)  # replaced by the best-weighted proposal seen
    best_weight = np.full(rows, -np.inf)
    todo = np.arange(rows)
    chunk, spent = 64, 0  # each proposal is kept with probability TV(p, q)
    while todo.size and spent < max_proposals:
        if spent == 0:  # every row: views, no gathers
            pm, ps, qm, qs, sh = p_mean[:, None], p_sigma[:, None], q_mean[:, None], q_sigma[:, None], shift[:, None]
        else:
            pm, ps, qm, qs, sh = (p_mean[todo, None], p_sigma[todo, None], q_mean[todo, None], q_sigma[todo, None],
                                  shift[todo, None])
        z = rng.standard_normal((todo.size, chunk, dim))
        y = pm + scale_of(ps, pm) * z
        f, g = residual_ratios(z, pm, ps, qm, qs, sh, reflected)
        weight = f - g                                               # [T, chunk]
        kept = rng.random(weight.shape) < weight
        hit = kept.any(axis=1)
        first = kept.argmax(axis=1)
        out[todo[hit]] = y[hit, first[hit]]
        miss = np.flatnonzero(~hit)
        if miss.size:  # the fallback candidate matters only for rows still without a sample
            top = weight[miss].argmax(axis=1)
            top_weight = weight[miss, top]
            better = top_weight > best_weight[todo[miss]]
            best[todo[miss[better]]] = y[miss[better], top[better]]
            best_weight[todo[miss[better]]] = top_weight[better]
        todo = todo[miss]
        spent += chunk
        chunk = min(chunk * 4, MAX_CHUNK, max(max_proposals - spent, 1))
    if todo.size:  # probability <= 1/(e * max_proposals) per row; see the module docstring
        level = logging.WARNING if not shift.any() else logging.DEBUG   # CSpD's residual may be empty: expected
        log.log(level, "residual sampling used its fallback for %d row(s) after %d proposals each (p ~= q)",
                    todo.size, spent)
        out[todo] = best[todo]
    return out


def accept_prefix(rng: np.random.Generator, drafts: np.ndarray, num_drafts: np.ndarray, p: TokenDistribution,
                  q: TokenDistribution, inner_temperature: float = 1.0, shift=None) -> np.ndarray:
    """The number of drafts kept per row [R]: draft i passes with probability min(1, p_i(x)/q_i(x)), left to right,
    up to the first rejection (only the first num_drafts[r] drafts of a row are tested). inner_temperature != 1
    divides the ratio's quadratic terms by its square (CSpD's official code uses 42; not exact, off by default).
    shift: offset_shift(p, q) over the drafts' slots, when the caller has it already."""
    rows, gamma = drafts.shape[:2]
    log_ratio = log_density_ratio(drafts, p.mean[:, :gamma], p.sigma[:, :gamma], q.mean, q.sigma,
                                  inner_temperature)                                          # log p/q
    log_ratio = log_ratio + (offset_shift(p, q, np.s_[:, :gamma]) if shift is None else shift)
    valid = np.arange(gamma)[None, :] < num_drafts[:, None]
    rejected = valid & (np.log(rng.random((rows, gamma))) >= log_ratio)
    first_rejection = rejected.argmax(axis=1) if gamma else np.zeros(rows, np.int64)
    return np.where(rejected.any(axis=1), first_rejection, num_drafts)


def accept_drafts(rng: np.random.Generator, drafts: np.ndarray, num_drafts: np.ndarray,
                  p: TokenDistribution, q: TokenDistribution,
                  inner_temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Left-to-right speculative acceptance for R samples with ragged draft counts.

    drafts [R, G, D] (G >= max num_drafts), num_drafts [R]; p has G+1 slots per row (p_i for token i, slot
    num_drafts is the bonus), q has G slots. Returns (accepted [R], next_token [R, D]): the number of drafts
    kept, and the token that follows them (residual sample at the first rejection, else the target's bonus).
    """
    shift = offset_shift(p, q, np.s_[:, :drafts.shape[1]])
    accepted = accept_prefix(rng, drafts, num_drafts, p, q, inner_temperature, shift)
    r = np.arange(len(drafts))
    next_token = sample_gaussian(rng, p.mean[r, accepted], p.sigma[r, accepted])   # bonus where all passed
    fix = np.flatnonzero(accepted < num_drafts)
    if fix.size:
        a = accepted[fix]
        if np.isscalar(shift):
            next_token[fix] = sample_residual(rng, p.mean[fix, a], p.sigma[fix, a], q.mean[fix, a], q.sigma[fix, a])
        else:   # CSpD's scored densities: max(0, e^s p - q) is empty when e^s p <= q everywhere (s < 0, p ~ q)
            next_token[fix] = sample_residual(rng, p.mean[fix, a], p.sigma[fix, a], q.mean[fix, a],
                                              q.sigma[fix, a], APPROX_MAX_PROPOSALS, shift[fix, a])
    return accepted, next_token


def speculative_token(rng: np.random.Generator, p_mean, p_sigma, q_mean, q_sigma) -> np.ndarray:
    """One speculative step with a single draft per row: x ~ q, keep with min(1, p/q), else residual. ~ p."""
    p = TokenDistribution(p_mean[:, None].repeat(2, axis=1), np.stack([p_sigma, p_sigma], 1), None)
    q = TokenDistribution(q_mean[:, None], q_sigma[:, None], None)
    drafts = sample_gaussian(rng, q.mean, q.sigma)
    accepted, next_token = accept_drafts(rng, drafts, np.ones(len(p_mean), np.int64), p, q)
    return np.where((accepted == 1)[:, None], drafts[:, 0], next_token)
