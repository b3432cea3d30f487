"""Run the speculative loop on two engine sets with the same seed and check they agree (shared by the
ONNX and AOTI backend tests)."""
import numpy as np
import torch

TIMING_KEYS = ("seconds", "total_seconds", "mode_rates")   # mode_rates: tokens and seconds


def generate_on_both(engines_a, engines_b, classes, gen, max_batch=8):
    """generate() on each engine set with one torch thread (tiny per-call work: avoid oversubscribing the CPU)."""
    from fastardiff.runtime.speculative import generate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (generate(engines_a, classes, gen, max_batch=max_batch),
                generate(engines_b, classes, gen, max_batch=max_batch))
    finally:
        torch.set_num_threads(threads)


def assert_same_run(run_a, run_b, atol=2e-3):
    """Images within float tolerance and exactly the same decoding statistics (all but the timings)."""
    (img_a, st_a), (img_b, st_b) = run_a, run_b
    np.testing.assert_allclose(img_a, img_b, atol=atol, rtol=0)
    counts = [{k: v for k, v in st.summary().items() if k not in TIMING_KEYS} for st in (st_a, st_b)]
    assert counts[0] == counts[1]
