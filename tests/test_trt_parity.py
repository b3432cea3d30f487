"""Export parity through Polygraphy's comparator (exporter/parity.py), the gate of the ONNX, AOTI and TensorRT
exports: its verdict and statistics are what the manifest records; the failing-element count must agree with it."""
from __future__ import annotations

import numpy as np
import pytest

from fastardiff.exporter import parity
from fastardiff.exporter.parity import ParityError, compare_arrays


def test_infinities_and_shared_nans_compare_equal_other_non_finite_values_fail():
    ref = np.array([np.inf, -np.inf, np.nan, 1.0, 2.0, 3.0, 0.0])
    same = compare_arrays(ref, ref.copy(), atol=1e-4, rtol=1e-3)
    assert same == {"max_abs": 0.0, "max_rel": 0.0, "mismatches": 0, "elements": 7}
    got = np.array([np.inf, np.inf, np.nan, np.inf, np.nan, 3.0 + 1e-9, 1e-20])
    bad = compare_arrays(ref, got, atol=0.0, rtol=1e-3)
    assert bad["mismatches"] == 3  # -inf vs inf, 1 vs inf, 2 vs NaN; 1e-20 vs 0 is within rtol of Polygraphy's eps


def test_statistics_are_polygraphys():
    ref = np.linspace(1.0, 2.0, 24, dtype=np.float32).reshape(2, 3, 4)
    got = ref.copy()
    got[1, 2, 3] += 5e-4            # within rtol 1e-3 of 2.0: passes, and is the largest error
    stats = compare_arrays(ref, got, atol=1e-4, rtol=1e-3)
    assert stats["mismatches"] == 0 and stats["elements"] == 24
    assert stats["max_abs"] == pytest.approx(5e-4, rel=1e-3) and stats["max_rel"] == pytest.approx(2.5e-4, rel=1e-3)
    got[0, 0, 0] += 1e-2            # 1.0 + 1e-2: outside both tolerances
    assert compare_arrays(ref, got, atol=1e-4, rtol=1e-3)["mismatches"] == 1


def test_polygraphys_verdict_must_agree_with_the_count(monkeypatch):
    """A Polygraphy release with other semantics stops the export instead of silently recording a wrong gate."""
    real = parity._polygraphy_compare

    class Passed:
        max_absdiff = max_reldiff = 1.0

        def __bool__(self):
            return True

    ref = np.zeros(4)
    monkeypatch.setattr(parity, "_polygraphy_compare", lambda *a: Passed())
    with pytest.raises(ParityError, match="passed an output in which fastardiff counts 1 elements"):
        compare_arrays(ref, np.array([0.0, 0.0, 0.0, 1.0]), atol=1e-4, rtol=1e-3)
    monkeypatch.setattr(parity, "_polygraphy_compare", real)
    assert not real(ref, np.array([0.0, 0.0, 0.0, 1.0]), 1e-4, 1e-3)  # the real one fails it


def test_engine_parity_compares_each_output_once_and_names_the_failing_shape(tiny_config, monkeypatch):
    """One comparison per output over all shapes; a failure is traced back to its shape."""
    import torch

    from fastardiff.exporter.engine_modules import make_engine_modules, shape_profiles
    from fastardiff.recipes.models import build_models

    torch.manual_seed(0)
    decoder = make_engine_modules(*build_models(tiny_config))["decoder"].eval()
    profile = shape_profiles(tiny_config, 4, 2)["decoder"]
    calls = []
    real = parity.compare_arrays
    monkeypatch.setattr(parity, "compare_arrays", lambda r, g, a, t: calls.append(r.shape) or real(r, g, a, t))

    def engine(inputs, nudge_batch=None):
        with torch.no_grad():
            out = decoder(*inputs).numpy()
        return [out + 1e-2 if out.shape[0] == nudge_batch else out]

    report = parity.check_engine_parity("decoder", engine, decoder, tiny_config, 0, profile, 1e-4, 1e-3)
    assert len(calls) == 1 and report["outputs"]["image"]["mismatches"] == 0
    assert report["outputs"]["image"]["elements"] == sum(b for b, _, _ in report["shapes"]) * 32 * 32
    with pytest.raises(ParityError, match="'decoder' output 'image' differs.*at batch=4 K=64 cache=0"):
        parity.check_engine_parity("decoder", lambda x: engine(x, 4), decoder, tiny_config, 0, profile, 1e-4, 1e-3)
