"""Models trained elsewhere (docs/export-your-model.md): a factory named `package.module:function` returning a
`ForeignModel`, weights loaded as tensors only, an architecture adapter per library, the `foreign-gaussian` family.

Python call: `export_foreign("my_pkg.models:digits", "weights.pt", "engines/", target="onnx")`.
"""
from __future__ import annotations

from .spec import FAMILY, ForeignGaussianConfig, ForeignModel  # noqa: F401


def load_foreign(ref: str, weights, atol: float = 1e-4, rtol: float = 1e-3):
    from .engines import load_foreign as load

    return load(ref, weights, atol, rtol)


def export_foreign(ref: str, weights, out, target: str = "onnx", draft=None, **options):
    """Build (or reuse) the engines of a foreign model: (manifest, cache_hit). `draft`: a draft file made for it
    (recipes/foreign_draft.py), adding the draft_step engine. `options`: ExportOptions fields."""
    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions

    return export_engines(weights, out, ExportOptions(target=target, **options), model=ref, draft_ckpt=draft)
