"""Entropy early stopping of drafting (fast-ardiff Algorithm 1 lines 9-14; drift-ar Sec. 4.3).

At draft step i the draft returns q_i together with its shallow-layer attention entropy H_i (the attention row
of the query that produces q_i). If H_i < tau the draft is in a low-entropy (over-confident) state: drafting
stops and the token x_i it would contribute is dropped, so the verify call gets the drafts before it.

  static:  tau = calibration tau_static = 0.3 E[H_shallow] - 0.1 std(H_shallow)            (fast-ardiff)
  context: tau_c = gamma_s * E_bar, E_bar <- 0.9 E_bar + 0.1 E_target for every token the target emits,
           per sample, initialised E_bar = tau_global / gamma_s, gamma_s = 0.8                (drift-ar)
  off:     never stop.

Whatever the threshold, the decision depends only on the already-fixed prefix, so it changes the cost of
speculation, never the distribution of the output.
"""
from __future__ import annotations

import numpy as np

EARLY_STOP_MODES = ("static", "context", "off")


class EarlyStop:
    """Per-sample thresholds; `observe_target` is fed the target entropies of the tokens it emits, in order."""

    def __init__(self, mode: str, batch: int, calibration: dict, gamma_s: float = 0.8, ema: float = 0.9):
        if mode not in EARLY_STOP_MODES:
            raise ValueError(f"unknown early-stop mode '{mode}'; choose one of {', '.join(EARLY_STOP_MODES)}")
        self.mode = mode
        self.gamma_s = gamma_s
        self.ema = ema
        self.tau_static = float(calibration["tau_static"])
        self.target_ema = np.full(batch, float(calibration["tau_global"]) / gamma_s)
        self._constant: dict[int, np.ndarray] = {}

    def threshold(self, samples: np.ndarray) -> np.ndarray:
        if self.mode == "static":
            return np.full(len(samples), self.tau_static)
        if self.mode == "context":
            return self.gamma_s * self.target_ema[samples]
        return np.full(len(samples), -np.inf)

    def threshold32(self, samples: np.ndarray) -> np.ndarray:
        """threshold() as the float32 engine input (-inf when off); constant thresholds are built once."""
        if self.mode == "context":
            return self.threshold(samples).astype(np.float32)
        cached = self._constant.get(len(samples))
        if cached is None:
            cached = self._constant[len(samples)] = self.threshold(samples).astype(np.float32)
        return cached

    def should_stop(self, samples: np.ndarray, shallow_entropy: np.ndarray) -> np.ndarray:
        if self.mode == "static":  # as against threshold(): a float64 scalar keeps the comparison in float64
            return shallow_entropy < np.float64(self.tau_static)
        if self.mode == "off":
            return np.zeros(len(shallow_entropy), bool)
        return shallow_entropy < self.threshold(samples)

    def observe_target(self, samples: np.ndarray, entropy: np.ndarray, counts: np.ndarray) -> None:
        """entropy [R, K]: target entropies of the tokens emitted this step; row r emitted counts[r] of them.
        `samples` may be a slice (every sample). Only the context threshold reads the running mean."""
        if self.mode != "context":
            return
        ema = self.target_ema[samples]
        for j in range(entropy.shape[1]):
            live = j < counts
            ema = np.where(live, self.ema * ema + (1 - self.ema) * entropy[:, j], ema)
        self.target_ema[samples] = ema
