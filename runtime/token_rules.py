"""Token rules: how a model family turns the AR's output at a position into that token's distribution (the
runtime side of the family registry; `TOKEN_RULES` maps a manifest's family to its rule).

- `drift-ar` (GaussianTokens): the AR outputs the token mean z and its entropy E; the token is
  N(z, (T sigma(E))^2 I). Both the draft's and the target's densities are explicit, so speculation is exact.
- `fast-ardiff` (DiffusionHeadTokens): the AR outputs a conditioning vector z; a per-token diffusion head turns
  z and a noise trajectory into the token (fast-ardiff, MAR's DiffLoss). The `head_<name>` engine runs every
  denoising step but the last and returns that last step's Gaussian N(mu, sigma^2 I) plus
  log_offset = -D sum_t log sigma_t over the earlier steps; the loop's Gaussian sampler draws the final step, so a
  target-only token is exactly the head's sample. Draft and target read the same trajectory noise for a token
  (CSpD's trajectory alignment: row b, token j always uses trajectory[b, j]), and the acceptance ratio is CSpD's
  final-step density ratio times prod_t sqrt(|Sigma_q,t| / |Sigma_p,t|) (TokenDistribution.log_offset): an
  approximation of p/q, not the exact ratio (the intermediate steps' densities are not scored).
  `--acceptance conditional` scores the final-step densities alone, which is exact: given the trajectory noise eps
  of a token (shared, drawn before and apart from every acceptance decision), the draft's and the target's tokens
  are the Gaussians q(x | eps) and p(x | eps), so the accept / residual rule returns a sample of p(x | eps), and
  eps is distributed as target-only sampling draws it; hence the token is distributed as target-only's p(x). It
  needs the shared noise (with independent trajectories the two conditionals condition on different noise).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from fastardiff.errors import EngineError, FastardiffError

from .distribution import SigmaParams, diagonal_gaussian
from .sampling import TokenDistribution, token_distribution

HEAD_PREFIX = "head_"


class GaussianTokens:
    exact = True
    diagonal = False          # sigma [...] per token (isotropic); DiagonalGaussianTokens: [..., D]

    def __init__(self, sigma: SigmaParams, temperature: float):
        self.sigma, self.temperature = sigma, temperature

    def distribution(self, mean, entropy, samples, first_token) -> TokenDistribution:
        return token_distribution(mean, entropy, self.sigma, self.temperature)


class DiagonalGaussianTokens:
    """foreign-gaussian: the engine's `mean` output is [mean, log variance] [..., 2D]; the token is
    N(mean, diag(T^2 max(var, floor))) (T: the temperature, scaling the standard deviation as the libraries do)."""
    exact = True
    diagonal = True

    def __init__(self, variance_floor: float, temperature: float):
        self.variance_floor, self.temperature = variance_floor, temperature

    def distribution(self, params, entropy, samples, first_token) -> TokenDistribution:
        mean, sigma = diagonal_gaussian(params, self.variance_floor)
        if self.temperature != 1.0:
            sigma = sigma * self.temperature
        return TokenDistribution(mean, sigma, entropy)


class DiffusionHeadTokens:
    diagonal = False

    def __init__(self, head: Callable, trajectory: np.ndarray, temperature: float, stats, score_offset: bool = True):
        """trajectory [B, columns, S, D] float32: the noise of token j of sample b is trajectory[b, j].
        score_offset: CSpD's earlier-step sigma factor enters the ratio (False: the exact conditional rule)."""
        self.head, self.trajectory, self.stats = head, trajectory, stats
        self.exact = not score_offset
        self.temperature = np.array([temperature], np.float32)

    def distribution(self, z, entropy, samples, first_token) -> TokenDistribution:
        """z [R, K, Z] at tokens first_token[r] .. first_token[r] + K - 1 of samples[r] (slots past the buffer
        read its last column: junk slots, never scored)."""
        rows, slots = z.shape[:2]
        cols = np.minimum(first_token[:, None] + np.arange(slots)[None, :], self.trajectory.shape[1] - 1)
        noise = self.trajectory[samples[:, None], cols]                        # [R, K, S, D]
        flat_z = np.ascontiguousarray(z.reshape(rows * slots, -1), dtype=np.float32)
        began = time.perf_counter()
        mean, sigma, log_offset = self.head(flat_z, noise.reshape((rows * slots,) + noise.shape[2:]),
                                            self.temperature)
        seconds = self.stats.seconds
        seconds["head"] = seconds.get("head", 0.0) + time.perf_counter() - began
        self.stats.head_calls += 1
        if not (np.isfinite(mean).all() and np.isfinite(sigma).all() and (sigma > 0).all()):
            raise EngineError("the diffusion head engine returned NaN, inf or a non-positive sigma; re-export it")
        return TokenDistribution(mean.reshape(rows, slots, -1).astype(np.float64),
                                 sigma.reshape(rows, slots).astype(np.float64), entropy,
                                 None if self.exact else log_offset.reshape(rows, slots).astype(np.float64))


def gaussian_rules(engines, gen, rng, batch: int, columns: int, stats):
    sigma = SigmaParams.from_config(engines.manifest.config, engines.manifest.calibration)
    rule = GaussianTokens(sigma, gen.temperature)
    return rule, rule


def diffusion_head_rules(engines, gen, rng, batch: int, columns: int, stats):
    """(draft rule, target rule) over the `head_<gen.head>` engine; one trajectory buffer shared by both, or
    two independent ones with gen.shared_noise False (the ablation of CSpD's trajectory alignment)."""
    name = HEAD_PREFIX + gen.head
    entry = engines.manifest.engines.get(name)
    if entry is None:
        heads = sorted(n[len(HEAD_PREFIX):] for n in engines.manifest.engines if n.startswith(HEAD_PREFIX))
        raise FastardiffError(f"these engines have no '{name}' engine (diffusion heads here: "
                              f"{', '.join(heads) or 'none'}); pass --head {' or --head '.join(heads) or 'student'}")
    steps = int(entry.steps)
    shape = (batch, columns, steps, int(engines.manifest.config["token_dim"]))
    head = engines.head(name)
    target_noise = rng.standard_normal(shape, dtype=np.float32)
    draft_noise = target_noise if gen.shared_noise else rng.standard_normal(shape, dtype=np.float32)
    cspd = gen.acceptance == "cspd"
    return (DiffusionHeadTokens(head, draft_noise, gen.temperature, stats, cspd),
            DiffusionHeadTokens(head, target_noise, gen.temperature, stats, cspd))


def diagonal_gaussian_rules(engines, gen, rng, batch: int, columns: int, stats):
    if gen.cfg_scale != 1.0:
        raise FastardiffError("classifier-free guidance needs a model trained with a null class; this model "
                              f"(family '{engines.manifest.family}') has none: drop --cfg")
    rule = DiagonalGaussianTokens(float(engines.manifest.config.get("variance_floor", 1e-5)), gen.temperature)
    return rule, rule


# family (manifest.family) -> factory(engines, gen, rng, batch, token columns, stats) -> (draft rule, target rule)
TOKEN_RULES: dict[str, Callable] = {"drift-ar": gaussian_rules, "fast-ardiff": diffusion_head_rules,
                                    "foreign-gaussian": diagonal_gaussian_rules}


def token_rules(engines, gen, rng, batch: int, columns: int, stats):
    family = engines.manifest.family
    if family not in TOKEN_RULES:
        raise FastardiffError(f"the engines are of model family '{family}', which this runtime does not know; "
                              f"known: {', '.join(sorted(TOKEN_RULES))}")
    return TOKEN_RULES[family](engines, gen, rng, batch, columns, stats)
