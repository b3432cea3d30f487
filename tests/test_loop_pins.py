"""The loop's output bytes pinned: seeded runs of every proposal kind on the CPU backends give exactly the tokens
(and, for one run per backend, the images) they gave when the digests below were recorded. A refactor of the
loop (runtime/speculative.py, runtime/proposals.py, runtime/capabilities.py) must keep every digest: the same
random streams, the same engine calls, the same acceptance decisions, the same statistics.

Floating-point bytes depend on the kernels the libraries pick for the CPU, so the digests are kept per machine
fingerprint (library versions and the CPU's vector ISA); on another fingerprint the test is skipped with the
command that records them there:  .venv/bin/python tests/test_loop_pins.py  (prints the table to paste).
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest

from fastardiff.runtime.generation import GenerationConfig
from fastardiff.runtime.speculative import generate
from fastardiff.runtime.stats import RunStats
from test_speculative import HostResolved   # the engines without target_jacobi: rounds resolved on the host

CLASSES = np.array([3, 7, 1])
COUNTERS = ("target_calls", "target_rows", "draft_calls", "verifies", "drafts_proposed", "drafts_accepted",
            "early_stops", "residual_samples", "bonus_tokens", "head_calls")

# name -> GenerationConfig fields; the ONNX engines have draft_rollout_1..2 (tests/conftest.py SHARED_ONNX_GAMMA)
# and the torch engines are built with max_gamma 2 as well, so gamma 3 drafts by draft_step calls
RUNS = {
    "target": dict(mode="target"),
    "target-cfg": dict(mode="target", cfg_scale=2.0),
    "draft-only": dict(mode="draft", num_tokens=24),
    "model-rollout": dict(gamma=2, early_stop="static"),
    "model-rollout-context-cfg": dict(gamma=2, early_stop="context", cfg_scale=2.0, num_tokens=32),
    "model-steps": dict(gamma=3, early_stop="static"),
    "model-steps-eta": dict(gamma=3, early_stop="context", eta=10.0, num_tokens=40),
    "model-engine-acceptance": dict(gamma=2, early_stop="off", engine_acceptance=True),
    "jacobi": dict(draft="jacobi", gamma=4),
    "jacobi-host-rounds": dict(draft="jacobi", gamma=4, host_rounds=True),
    "jacobi-independent-cfg": dict(draft="jacobi", gamma=6, coupling=False, cfg_scale=2.0, num_tokens=40),
    "image-model": dict(gamma=2, temperature=0.9, image=True),
    "image-jacobi": dict(draft="jacobi", gamma=8, image=True),
}
FAST_RUNS = {
    "fast-target": dict(mode="target", num_tokens=16),
    "fast-model": dict(gamma=2, num_tokens=16),
    "fast-model-conditional": dict(gamma=3, num_tokens=16, acceptance="conditional"),
}


def fingerprint() -> str:
    import onnxruntime
    import torch

    return (f"numpy {np.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"cpu {torch.backends.cpu.get_cpu_capability()}")


def digest(engines, run: dict, seed: int) -> str:
    run = dict(run)
    image, host_rounds = run.pop("image", False), run.pop("host_rounds", False)
    if not image:
        run.setdefault("num_tokens", 64)
    gen = GenerationConfig(seed=seed, **run)
    stats = RunStats()
    out, stats = generate(HostResolved(engines) if host_rounds else engines, CLASSES, gen, stats)
    h = hashlib.sha256(np.ascontiguousarray(out, np.float32).tobytes())
    h.update(repr([getattr(stats, c) for c in COUNTERS]).encode())
    return h.hexdigest()[:16]


def backend_engines(name: str, request):
    if name == "torch":
        from fastardiff.exporter.torch_backend import TorchEngines

        return TorchEngines(request.getfixturevalue("shipped_checkpoint"), max_gamma=2)
    if name == "torch-device-loop":
        from fastardiff.exporter.torch_backend import TorchEngines

        return TorchEngines(request.getfixturevalue("shipped_checkpoint"), max_gamma=2, device_loop=True,
                            loop_noise="host")
    from fastardiff.runtime.engine import load_engines

    engine_dir, _, _ = request.getfixturevalue("shared_onnx_export")
    return load_engines(engine_dir)


def fast_engines():
    from fastardiff.exporter.torch_backend import TorchEngines

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_fast_ardiff_runtime import small_checkpoint

    return TorchEngines(small_checkpoint(), max_gamma=3)


# fingerprint -> backend -> run -> digest (seed 11)
PINS: dict[str, dict[str, dict[str, str]]] = {}
PINS['numpy 2.4.6, torch 2.13.0+cpu, onnxruntime 1.32.0, cpu AVX512'] = {'fast-ardiff': {'fast-model': '150df74d3c3748af',
                 'fast-model-conditional': 'b5c760072915955e',
                 'fast-target': 'ab38dc9d5111d9da'},
 'onnxruntime': {'draft-only': 'f89a27e4223f0176',
                 'image-jacobi': '1d2999f2ba308392',
                 'image-model': 'c54955e17d986e59',
                 'jacobi': '31ce88eec14f4acc',
                 'jacobi-host-rounds': 'fd280ea1b788505d',
                 'jacobi-independent-cfg': '9c3ad622ae302e5d',
                 'model-engine-acceptance': '6d0292d194ed7ffc',
                 'model-rollout': '17ed946bbf8a70b1',
                 'model-rollout-context-cfg': '1f4caf10d7cf3b4e',
                 'model-steps': '94961646aec68682',
                 'model-steps-eta': '5d82bfcd98c3609f',
                 'target': '9730b9f937c1d54e',
                 'target-cfg': '183b659000ddadd8'},
 'torch': {'draft-only': '1afd90bd0b902684',
           'image-jacobi': 'e9909f83f439bba1',
           'image-model': '6378dd696c094f5b',
           'jacobi': '3d6336aa6e3d17c3',
           'jacobi-host-rounds': '95c7f57f85587ae0',
           'jacobi-independent-cfg': 'f009d100d60355b3',
           'model-engine-acceptance': 'c9c0acd2186155a0',
           'model-rollout': '003416f5a9bb9f51',
           'model-rollout-context-cfg': 'f582c841f666374e',
           'model-steps': '9f57bd9fdbde868f',
           'model-steps-eta': 'b4071988eba6f8e8',
           'target': 'ffbed7d6f1813011',
           'target-cfg': 'e08f7b124d9ffbd7'},
 'torch-device-loop': {'draft-only': '1afd90bd0b902684',
                       'image-jacobi': 'e9909f83f439bba1',
                       'image-model': '048e39405cea81f4',
                       'jacobi': '3d6336aa6e3d17c3',
                       'jacobi-host-rounds': '95c7f57f85587ae0',
                       'jacobi-independent-cfg': 'f009d100d60355b3',
                       'model-engine-acceptance': 'c9c0acd2186155a0',
                       'model-rollout': 'f2e535f59649e756',
                       'model-rollout-context-cfg': '7a749b3a510f83ab',
                       'model-steps': '46d1376150cd89e1',
                       'model-steps-eta': '86921f771686d335',
                       'target': 'ffbed7d6f1813011',
                       'target-cfg': 'e08f7b124d9ffbd7'}}

BACKENDS = ("torch", "torch-device-loop", "onnxruntime")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The digests are recorded with one intra-op thread: torch's CPU kernels split their reductions by thread
    count (2 threads give other float bits), and another test in the same worker may have changed the count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pins():
    table = PINS.get(fingerprint())
    if table is None:
        pytest.skip(f"no digests recorded for this machine ({fingerprint()}); record them with "
                    "`.venv/bin/python tests/test_loop_pins.py` on the code before a loop refactor")
    return table


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_runs_give_the_recorded_bytes(backend, pins, request):
    engines = backend_engines(backend, request)
    got = {name: digest(engines, run, 11) for name, run in RUNS.items()}
    assert got == pins[backend]


def test_fast_ardiff_runs_give_the_recorded_bytes(pins):
    engines = fast_engines()
    got = {name: digest(engines, run, 11) for name, run in FAST_RUNS.items()}
    assert got == pins["fast-ardiff"]


def test_a_changed_stream_changes_the_digest(request):
    """The digest sees one changed draw (the pins would catch a refactor that moves a random stream)."""
    engines = backend_engines("torch", request)
    run = RUNS["jacobi"]
    assert digest(engines, run, 11) == digest(engines, run, 11)
    assert digest(engines, run, 11) != digest(engines, run, 12)
    assert digest(engines, run, 11) != digest(engines, dict(run, coupling=False), 11)


def record() -> dict:
    """Every digest on this machine (run as a script: prints the PINS entry to paste)."""
    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions
    from fastardiff.recipes.checkpoint import default_checkpoint_path, load_checkpoint
    import tempfile

    ckpt_path = default_checkpoint_path()
    ckpt = load_checkpoint(ckpt_path)
    out = tempfile.mkdtemp(prefix="pins-onnx-")

    class Request:
        def getfixturevalue(self, name):
            if name == "shipped_checkpoint":
                return ckpt
            export_engines(ckpt_path, out + "/engines", ExportOptions(target="onnx", gamma=2))
            return out + "/engines", None, None

    table = {b: {name: digest(backend_engines(b, Request()), run, 11) for name, run in RUNS.items()}
             for b in BACKENDS}
    engines = fast_engines()
    table["fast-ardiff"] = {name: digest(engines, run, 11) for name, run in FAST_RUNS.items()}
    return table


if __name__ == "__main__":
    import pprint

    import torch

    torch.set_num_threads(1)

    print(f"PINS[{fingerprint()!r}] = ", end="")
    pprint.pprint(record(), width=110)
