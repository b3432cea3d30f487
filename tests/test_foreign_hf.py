"""Hugging Face backbones (tiny LlamaModel / Qwen2Model fed inputs_embeds, a token embedding and a per-token
Gaussian head): the adapter against the library's forward, and target-only / Jacobi sampling against the library's
own DynamicCache sampler by the two-sample test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_runner import run_cli
from fastardiff.recipes import hf_llama_mnist as hf
from fastardiff.recipes.two_sample import two_sample_pvalue

pytestmark = pytest.mark.slow
TOKENS, SAMPLES = 8, 300


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    holder = hf.build("llama")
    hf.train(holder, steps=60, progress=False)
    path = hf.save_state_dict(holder, tmp_path_factory.mktemp("llama") / "llama.pt")
    return "fastardiff.recipes.hf_llama_mnist:digits", path, holder


@pytest.fixture(scope="session")
def llama_engines(trained_llama):
    from fastardiff.exporter.foreign import load_foreign
    from fastardiff.exporter.torch_backend import TorchEngines

    ref, path, _ = trained_llama
    ckpt = load_foreign(ref, path)
    assert ckpt.meta["library_parity"]["cached_max_abs"] < 1e-4
    return TorchEngines(ckpt)


@pytest.fixture(scope="session")
def library_samples(trained_llama):
    classes = np.arange(SAMPLES) % 10
    torch.manual_seed(7)
    return classes, hf.sample(trained_llama[2], torch.from_numpy(classes), TOKENS).numpy()


def test_qwen2_adapter_matches_library_forward(tmp_path):
    from fastardiff.exporter.foreign import load_foreign

    spec = hf.digits_qwen2()
    holder = torch.nn.Module()
    holder.model, holder.embed, holder.head = spec.model, spec.embed, spec.head
    torch.save(holder.state_dict(), tmp_path / "q.pt")
    ckpt = load_foreign("fastardiff.recipes.hf_llama_mnist:digits_qwen2", tmp_path / "q.pt")
    assert ckpt.config.architecture["class"] == "Qwen2Model" and ckpt.config.heads == 2   # kv heads: the cache's
    assert ckpt.meta["library_parity"]["sequence_max_abs"] < 1e-4


@pytest.mark.parametrize("mode, draft", [("target", "model"), ("speculative", "jacobi")])
def test_llama_sampling_matches_the_library(llama_engines, library_samples, mode, draft):
    from fastardiff.runtime.speculative import GenerationConfig, generate

    classes, reference = library_samples
    ours, stats = generate(llama_engines, classes, GenerationConfig(mode=mode, draft=draft, gamma=3, seed=3,
                                                                    num_tokens=TOKENS))
    assert two_sample_pvalue(ours, reference) > 1e-3
    if mode == "speculative":
        assert stats.drafts_accepted > 0


def test_backbone_without_head_is_refused(tmp_path, capsys):
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
    code, _, err = run_cli(["export", "--model", "foreign_factories:llama_without_head", "--ckpt",
                            str(tmp_path / "w.pt"), "--target", "onnx", "--out", str(tmp_path / "e")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "has no per-token head" in lines[0], err
    assert not (tmp_path / "e").exists()
