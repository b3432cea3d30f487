"""The token distribution N(z, sigma(E)^2 I) shared by training (torch) and the runtime (numpy).

sigma(E) = sigma_max * (exp(E/tau) - 1) / (exp(E_max/tau) - 1)   (drift-ar Eq. 6), floored at sigma_min so
that both densities stay proper and the speculative acceptance ratio p/q is always defined.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SigmaParams:
    sigma_max: float
    tau_sigma: float
    e_max: float
    sigma_min: float

    @classmethod
    def from_config(cls, config: dict, calibration: dict) -> "SigmaParams":
        return cls(float(config["sigma_max"]), float(config["tau_sigma"]), float(calibration["e_max"]),
                   float(config["sigma_min"]))


def sigma_from_entropy(entropy, p: SigmaParams):
    """Works on numpy arrays and torch tensors alike (same formula, one definition)."""
    denom = math.expm1(p.e_max / p.tau_sigma)
    if isinstance(entropy, np.ndarray) or np.isscalar(entropy):
        return np.maximum(p.sigma_max * np.expm1(np.asarray(entropy) / p.tau_sigma) / denom, p.sigma_min)
    return (p.sigma_max * (entropy / p.tau_sigma).expm1() / denom).clamp(min=p.sigma_min)


def gaussian_logpdf(x: np.ndarray, mean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """log N(x; mean, sigma^2 I) summed over the last axis; sigma has one value per token (shape x.shape[:-1])."""
    d = x.shape[-1]
    sq = np.sum((x - mean) ** 2, axis=-1)
    return -0.5 * sq / sigma**2 - d * np.log(sigma) - 0.5 * d * math.log(2 * math.pi)


def diagonal_gaussian(params: np.ndarray, variance_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The foreign-gaussian family's token N(mean, diag(sigma^2)) from an engine's output [..., 2D] = [mean, log
    variance]: (mean [..., D], sigma [..., D]) with sigma = sqrt(max(exp(log variance), floor)), in float64 (the
    clamp is the library's own before its square root: x-transformers samples N(mean, sqrt(max(var, 1e-5))))."""
    params = np.asarray(params, np.float64)
    dim = params.shape[-1] // 2
    log_var = np.maximum(params[..., dim:], math.log(variance_floor))
    return params[..., :dim], np.exp(0.5 * log_var)
