"""torch.export / AOTInductor with the fused Triton entropy attention op inside an ARTransformer.

CPU: the exported program keeps `fastardiff.entropy_attention` as one node per entropy layer (the op's body is
not decomposed by export), survives save/load, and runs (CPU body = reference). GPU: the AOTInductor package
compiled on CUDA runs the Triton kernels and matches the reference model.
"""
from __future__ import annotations

import zipfile

import pytest
import torch

from fastardiff.exporter.engine_modules import example_inputs
from fastardiff.recipes.config import get_config
from fastardiff.recipes.models import ARTransformer

FUSED_OP = "fastardiff.entropy_attention.default"


def tiny_target(device="cpu", attention_impl="triton"):
    cfg = get_config("tiny-mnist")
    torch.manual_seed(0)
    return cfg, ARTransformer(cfg, cfg.target_layers, attention_impl=attention_impl).eval().to(device)


def dynamic_shapes(cfg):
    batch = torch.export.Dim("batch", min=1, max=8)
    new_tokens = torch.export.Dim("new_tokens", min=1, max=cfg.seq_len)
    cache = torch.export.Dim("cache", min=0, max=cfg.seq_len)
    return ({0: batch, 1: new_tokens}, {0: batch}, {1: batch, 3: cache}, {1: batch, 3: cache}, {0: batch})


def export_model(model, cfg, inputs):
    with torch.no_grad():
        return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes(cfg))


def fused_op_nodes(program) -> list:
    return [n for n in program.graph.nodes if n.op == "call_function" and str(n.target) == FUSED_OP]


def reference_outputs(model, inputs):
    impl = model.attention_impl
    model.attention_impl = "reference"
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        model.attention_impl = impl


def assert_outputs_close(got, want, tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.float().cpu(), w.float().cpu(), atol=tol, rtol=tol)


def test_export_keeps_fused_op_and_runs(tmp_path):
    cfg, model = tiny_target()
    inputs = example_inputs(cfg, "target_verify", cfg.target_layers, batch=3, new_tokens=4, cache=20)
    program = export_model(model, cfg, inputs)
    nodes = fused_op_nodes(program)
    assert len(nodes) == len({model.entropy_layer, model.shallow_layer})
    # the exported graph holds the op itself, not its Triton launches or the reference's softmax
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("triton_kernel_wrapper" in t or "logsumexp" in t for t in targets)
    assert all(node.args[6] is True for node in nodes)  # normalize

    path = tmp_path / "target.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    assert len(fused_op_nodes(loaded)) == len(nodes)
    # other shapes than the example: the dynamic batch, K and cache dims are symbolic
    other = example_inputs(cfg, "target_verify", cfg.target_layers, batch=2, new_tokens=1, cache=33, seed=1)
    with torch.no_grad():
        assert_outputs_close(loaded.module()(*other), reference_outputs(model, other), 1e-5)


def test_reference_model_exports_without_fused_op():
    cfg, model = tiny_target(attention_impl="reference")
    inputs = example_inputs(cfg, "draft_step", cfg.target_layers, batch=2, new_tokens=3, cache=10)
    assert fused_op_nodes(export_model(model, cfg, inputs)) == []


@pytest.mark.gpu
def test_aoti_cuda_package_runs_triton_kernels_and_matches_reference(tmp_path):
    cfg, model = tiny_target(device="cuda")
    inputs = tuple(t.cuda() for t in example_inputs(cfg, "target_verify", cfg.target_layers, 3, 4, 20))
    program = export_model(model, cfg, inputs)
    assert fused_op_nodes(program)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "target.pt2"))
    with zipfile.ZipFile(package) as archive:
        texts = [archive.read(name).decode("utf-8", "ignore") for name in archive.namelist()
                 if name.endswith((".cpp", ".py", ".json", ".h"))]
    assert any("_entropy_attention_kernel" in text for text in texts), "Triton kernel not compiled into the package"
    runner = torch._inductor.aoti_load_package(package)
    for batch, new_tokens, cache, seed in [(3, 4, 20, 0), (1, 1, 40, 1), (8, 6, 0, 2), (2, 63, 0, 3)]:
        case = tuple(t.cuda() for t in example_inputs(cfg, "target_verify", cfg.target_layers, batch, new_tokens,
                                                      cache, seed=seed))
        assert_outputs_close(runner(*case), reference_outputs(model, case), 1e-4)
