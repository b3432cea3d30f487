"""Models trained elsewhere (exporter/foreign): x-transformers' continuous AR through `--model`, its adapter gated by
parity with the library's own forward, and the runtime's diagonal-Gaussian sampling checked against the library's
own `generate()` by a two-sample test that catches the variance read as a standard deviation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_runner import run_cli
from fastardiff.errors import CheckpointError
from fastardiff.recipes import xtransformers_mnist as xt
from fastardiff.recipes.two_sample import two_sample_pvalue

pytestmark = pytest.mark.slow
TOKENS = 8          # tokens per sequence in the two-sample tests (the first rows of the digit)
SAMPLES = 300


@pytest.fixture(scope="session")
def trained_small(tmp_path_factory):
    """digits_small trained briefly by the library's own wrapper: (factory ref, weights path, wrapper)."""
    torch.set_num_threads(1)
    wrapper = xt.digits_small().model
    xt.train(wrapper, steps=60, batch=32, lr=3e-3, progress=False)
    path = xt.save_state_dict(wrapper, tmp_path_factory.mktemp("xt") / "small.pt")
    return "fastardiff.recipes.xtransformers_mnist:digits_small", path, wrapper


@pytest.fixture(scope="session")
def foreign_ckpt(trained_small):
    from fastardiff.exporter.foreign import load_foreign

    ref, path, _ = trained_small
    return load_foreign(ref, path)


@pytest.fixture(scope="session")
def library_tokens(trained_small):
    """The library's own sampler: wrapper.generate(start token, TOKENS) for classes 0..9 repeated."""
    wrapper = trained_small[2]
    classes = np.arange(SAMPLES) % 10
    torch.manual_seed(123)
    start = xt.class_start_tokens()[torch.from_numpy(classes)].unsqueeze(1)
    return classes, wrapper.generate(start, TOKENS).numpy()


def our_tokens(engines, classes, **gen):
    from fastardiff.runtime.speculative import GenerationConfig, generate

    tokens, stats = generate(engines, classes, GenerationConfig(num_tokens=TOKENS, **gen))
    return tokens, stats


@pytest.fixture(scope="session")
def torch_engines(foreign_ckpt):
    from fastardiff.exporter.torch_backend import TorchEngines

    return TorchEngines(foreign_ckpt)


@pytest.mark.parametrize("factory", ["absolute_layernorm", "rotary_rmsnorm_glu", "grouped_query"])
def test_adapter_matches_library_forward(factory, tmp_path):
    from fastardiff.exporter.foreign import load_foreign

    spec = getattr(__import__("foreign_factories"), factory)()
    torch.save(spec.model.state_dict(), tmp_path / "w.pt")
    ckpt = load_foreign(f"foreign_factories:{factory}", tmp_path / "w.pt")
    parity = ckpt.meta["library_parity"]
    assert parity["sequence_max_abs"] < 1e-4 and parity["cached_max_abs"] < 1e-4
    assert ckpt.config.family == "foreign-gaussian" and ckpt.config.ar_out_dim == 32


def test_parity_gate_catches_an_adapter_that_differs(tmp_path, monkeypatch):
    """The gate can fail: rotary positions left out of the adapter are caught against the library's forward."""
    from fastardiff.exporter.foreign import load_foreign
    from fastardiff.exporter.foreign.xtransformers import XTransformersAR

    spec = __import__("foreign_factories").rotary_rmsnorm_glu()
    torch.save(spec.model.state_dict(), tmp_path / "w.pt")
    monkeypatch.setattr(XTransformersAR, "_rotate", lambda self, t, positions: t)
    with pytest.raises(CheckpointError, match="does not reproduce the library's forward"):
        load_foreign("foreign_factories:rotary_rmsnorm_glu", tmp_path / "w.pt")


@pytest.mark.parametrize("factory, message", [
    ("no_such_module_here:make", "module 'no_such_module_here' is not importable"),
    ("foreign_factories:missing", "has no function 'missing'"),
    ("foreign_factories:not_a_spec", "not a fastardiff.exporter.foreign.ForeignModel"),
    ("foreign_factories:qk_norm", "option attn_qk_norm is not supported"),
    ("foreign_factories:bidirectional", "bidirectional"),
    ("foreign_factories:point_estimate", "no per-token distribution"),
    ("foreign_factories:rotary_rmsnorm_glu", "does not fit the model: "),
    ("os:system(1)", "is not of the form package.module:function"),
])
def test_bad_input_is_one_error_line_and_nothing_written(factory, message, tmp_path, capsys):
    import foreign_factories

    name = factory.split(":")[1]
    weights = tmp_path / "w.pt"
    maker = getattr(foreign_factories, name, None)
    if callable(maker) and name != "rotary_rmsnorm_glu":
        spec = maker()
        torch.save((spec.model if hasattr(spec, "model") else spec).state_dict(), weights)
    else:   # weights of another shape: the absolute-position model's, for the rotary factory (or any tensors)
        torch.save(foreign_factories.absolute_layernorm().model.state_dict(), weights)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(["export", "--model", factory, "--ckpt", str(weights), "--target", "onnx", "--out",
                              str(tmp_path / "engines")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


class Unpickled:
    """An object whose unpickling leaves a mark (a file): loading weights must never unpickle it."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __setstate__(self, state):
        open(state["mark"], "w").close()


def test_weights_are_loaded_as_tensors_only(tmp_path):
    """A pickle with an object in it is refused by torch.load(weights_only=True): nothing is unpickled."""
    from fastardiff.exporter.foreign.spec import read_state_dict

    torch.save({"x": torch.zeros(1), "object": Unpickled(tmp_path / "unpickled")}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="not a readable state dict"):
        read_state_dict(tmp_path / "w.pt")
    assert not (tmp_path / "unpickled").exists()


def test_target_only_samples_the_library_distribution(torch_engines, library_tokens, monkeypatch):
    """Target-only sampling on the adapter == the library's own generate(), by the two-sample test; the same test
    fails when the variance is read as a standard deviation (the negative control)."""
    classes, reference = library_tokens
    ours, _ = our_tokens(torch_engines, classes, mode="target", seed=5)
    assert two_sample_pvalue(ours, reference) > 1e-3

    import fastardiff.runtime.token_rules as rules

    def variance_as_std(params, floor):
        dim = params.shape[-1] // 2
        return params[..., :dim].astype(np.float64), np.maximum(np.exp(params[..., dim:].astype(np.float64)), floor)

    monkeypatch.setattr(rules, "diagonal_gaussian", variance_as_std)
    wrong, _ = our_tokens(torch_engines, classes, mode="target", seed=5)
    assert two_sample_pvalue(wrong, reference) < 1e-3


@pytest.mark.parametrize("coupling", [True, False])
def test_jacobi_matches_the_library_distribution(torch_engines, library_tokens, coupling):
    classes, reference = library_tokens
    ours, stats = our_tokens(torch_engines, classes, mode="speculative", draft="jacobi", gamma=3,
                             coupling=coupling, seed=11)
    assert stats.drafts_accepted > 0                      # guesses passed: it speculated
    assert two_sample_pvalue(ours, reference) > 1e-3


def test_diagonal_residual_is_exact():
    """The reflected residual with diagonal scales samples max(0, p - q) exactly (a 1-D check per coordinate:
    the residual's marginal is not Gaussian, so compare with rejection sampling from p, the textbook sampler)."""
    from fastardiff.runtime.sampling import reflected_residual, sample_residual

    rng = np.random.default_rng(0)
    rows, dim = 4000, 3
    p_mean, q_mean = np.zeros((rows, dim)), np.tile([0.6, -0.2, 0.1], (rows, 1))
    p_sigma, q_sigma = np.tile([0.5, 1.0, 0.3], (rows, 1)), np.tile([0.8, 0.7, 0.3], (rows, 1))
    # x ~ the excess max(0, q - p): draws from q rejected by the acceptance test
    from fastardiff.runtime.sampling import log_density_ratio

    x = np.empty((rows, dim))
    todo = np.arange(rows)
    while todo.size:
        draw = q_mean[todo] + q_sigma[todo] * rng.standard_normal((todo.size, dim))
        rejected = np.log(rng.random(todo.size)) >= log_density_ratio(draw, p_mean[todo], p_sigma[todo],
                                                                      q_mean[todo], q_sigma[todo])
        x[todo[rejected]] = draw[rejected]
        todo = todo[~rejected]
    mirrored = reflected_residual(rng, x, p_mean, p_sigma, q_mean, q_sigma)
    plain = sample_residual(rng, p_mean, p_sigma, q_mean, q_sigma)
    assert two_sample_pvalue(mirrored[:, None], plain[:, None]) > 1e-3
    isotropic = reflected_residual(rng, x, p_mean, p_sigma[:, 0], q_mean, q_sigma[:, 0])   # the wrong (isotropic) law
    assert two_sample_pvalue(isotropic[:, None], plain[:, None]) < 1e-3


@pytest.fixture(scope="session")
def onnx_engines(trained_small, tmp_path_factory):
    from fastardiff.exporter.foreign import engines as foreign_engines
    from fastardiff.exporter.foreign import export_foreign

    ref, path, _ = trained_small
    out = tmp_path_factory.mktemp("xt-onnx") / "engines"
    saved = foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES
    foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES = (2, 4), 10   # the quick calibration
    try:
        manifest, hit = export_foreign(ref, path, out, target="onnx", max_batch=8, gamma=4)
    finally:
        foreign_engines.JACOBI_WINDOWS, foreign_engines.CALIBRATION_IMAGES = saved
    assert not hit
    return out, manifest


def test_onnx_export_passes_every_parity_gate(onnx_engines):
    out, manifest = onnx_engines
    data = json.loads((out / "manifest.json").read_text())
    assert data["family"] == "foreign-gaussian" and sorted(data["engines"]) == ["decoder", "target_verify"]
    assert data["export"]["library_parity"]["cached_max_abs"] < 1e-4
    for name, entry in data["engines"].items():
        assert entry["parity"]["outputs"] and all(v["mismatches"] == 0 for v in entry["parity"]["outputs"].values())
    assert data["config"]["variance_floor"] == 1e-5 and data["config"]["library"] == "x-transformers"
    per_call = data["calibration"]["extra"]["jacobi_tokens_per_call"]["1"]   # --gamma auto's Jacobi figures
    assert set(per_call) == {"2", "4"} and all(t >= 1.0 for t in per_call.values())


def test_run_on_onnx_engines_matches_library(onnx_engines, library_tokens, tmp_path, capsys):
    from fastardiff.runtime.engine import load_engines

    out, _ = onnx_engines
    code, _, err = run_cli(["run", "--engine", str(out), "--prompt", "three,7", "--mode", "target", "--out",
                            str(tmp_path / "t.png")], capsys)
    assert code == 0 and (tmp_path / "t.png").stat().st_size > 0, err
    code, out_text, err = run_cli(["run", "--engine", str(out), "--prompt", "1", "--gamma", "auto", "--out",
                                   str(tmp_path / "a.png"), "-v"], capsys)        # plans from the calibration
    assert code == 0 and "gamma auto:" in out_text + err and "jacobi" in out_text + err, err
    classes, reference = library_tokens
    engines = load_engines(out)
    target, _ = our_tokens(engines, classes, mode="target", seed=21)
    assert two_sample_pvalue(target, reference) > 1e-3
    jacobi, _ = our_tokens(engines, classes, mode="speculative", draft="jacobi", gamma=4, seed=22)
    assert two_sample_pvalue(jacobi, reference) > 1e-3


def test_feed_past_the_sequence_end_reads_clamped_positions(tmp_path):
    """Ragged Jacobi rounds pad a row's feed past its end (junk positions past the absolute-position table): the
    adapter runs, and the row's real position gives the same output as a feed that stops there."""
    from fastardiff.exporter.foreign import load_foreign

    spec = __import__("foreign_factories").absolute_layernorm()
    torch.save(spec.model.state_dict(), tmp_path / "w.pt")
    ckpt = load_foreign("foreign_factories:absolute_layernorm", tmp_path / "w.pt")
    model, cfg = ckpt.target, ckpt.config
    length = cfg.seq_len - 1                                   # the last position of the table
    cache = torch.randn(model.num_layers, 1, model.kv_heads, length, model.head_dim)
    tokens = torch.randn(1, 4, cfg.token_dim)
    with torch.no_grad():
        padded = model(tokens, torch.tensor([length]), cache, cache, torch.tensor([3]))[0]
        alone = model(tokens[:, :1], torch.tensor([length]), cache, cache, torch.tensor([3]))[0]
    assert torch.allclose(padded[:, :1], alone, atol=1e-5)


def test_onnx_export_renames_internal_values_named_like_outputs(tmp_path):
    """A library's RMSNorm computes x.mean(-1): the exporter names that value 'mean', the engine's output name; the
    export renames the internal one, so the file loads (else: 'Duplicate definition of name (mean)')."""
    import onnxruntime as ort

    from fastardiff.exporter.onnx_target import export_onnx_file

    class Norm(torch.nn.Module):
        def forward(self, tokens):
            return tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = torch.randn(2, 3, 4)
    path = export_onnx_file(Norm(), (x,), tmp_path / "n.onnx", ["tokens"], ["mean"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, = session.run(["mean"], {"tokens": x.numpy()})
    assert np.allclose(got, Norm()(x).numpy(), atol=1e-6)
