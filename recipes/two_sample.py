"""The two-sample test the losslessness checks use: are two sets of generated token sequences [B, T, D] drawn
from one distribution? Kolmogorov-Smirnov tests on per-token statistics (the mean over D, and the first two
coordinates) for every token, Bonferroni-corrected over the 3 T tests (scipy: the `train` extra)."""
from __future__ import annotations

import numpy as np


def two_sample_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats as sps

    pvals = []
    for t in range(a.shape[1]):
        for stat in (lambda x: x.mean(-1), lambda x: x[..., 0], lambda x: x[..., 1]):
            pvals.append(sps.ks_2samp(stat(a[:, t]), stat(b[:, t])).pvalue)
    return min(1.0, min(pvals) * len(pvals))
