"""`fastardiff bench pipeline` rows for diffusion-head families (fast-ardiff): the paper's Table 1 on our model.

Rows (same JSON keys as the drift-ar rows, plus class accuracy and Fréchet distance):
  baseline             target-only with the many-step teacher head (the MAR-style AR + diffusion pipeline)
  speculative-teacher  speculation only (draft + CSpD acceptance, teacher head)
  target               the distilled student head only
  speculative          both (the shipped configuration)
and the ablations measured in the same run: `speculative-independent-noise` (no trajectory alignment: draft and
target draw their own noise), `speculative-conditional` (the exact final-step ratio, runtime/token_rules.py) and
`speculative-no-early-stop`. Speed rows are timed interleaved (A B C D A B C D),
quality comes from a separate untimed generation of `quality_images` images per row at the engines' batch.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("fastardiff.bench")

HEAD_COLUMNS = ("backend", "batch", "mode", "gamma", "ms/image", "speedup", "head %", "verify %", "draft %",
                "outside engines %", "tok/target call", "accept rate", "class acc", "frechet")


def head_modes(gamma: int, early_stop: str, seed: int, ablations: bool = True) -> dict:
    """Row mode -> GenerationConfig."""
    from fastardiff.runtime.speculative import GenerationConfig

    def cfg(mode, head, **kw):
        return GenerationConfig(mode=mode, head=head, gamma=gamma, early_stop=kw.pop("early_stop", early_stop),
                                seed=seed, **kw)

    modes = {"baseline": cfg("target", "teacher"), "speculative-teacher": cfg("speculative", "teacher"),
             "target": cfg("target", "student"), "speculative": cfg("speculative", "student")}
    if ablations:
        modes["speculative-independent-noise"] = cfg("speculative", "student", shared_noise=False)
        modes["speculative-conditional"] = cfg("speculative", "student", acceptance="conditional")
        if early_stop != "off":
            modes["speculative-no-early-stop"] = cfg("speculative", "student", early_stop="off")
    return modes


class QualityScorer:
    """Class accuracy and Fréchet distance (the shipped classifier's feature space, against the held-out real test
    digits) of runtime-generated images."""

    def __init__(self, classifier_path):
        import torch

        from fastardiff.recipes.classifier import load_classifier
        from fastardiff.recipes.data import load_digit_split
        from fastardiff.recipes.evaluate import classifier_features

        self.torch = torch
        self.classifier = load_classifier(classifier_path)
        self.real_features, _ = classifier_features(self.classifier, load_digit_split().test_images)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        from fastardiff.recipes.evaluate import classifier_features, frechet_distance

        feats, pred = classifier_features(self.classifier, self.torch.from_numpy(np.asarray(images, np.float32)))
        return {"class accuracy": float((pred == labels).mean()),
                "frechet distance": frechet_distance(feats, self.real_features), "quality images": len(labels)}


def head_family_rows(backend: str, engines, batch: int, repeats: int, gamma: int, early_stop: str, seed: int,
                     quality_images: int, scorer: QualityScorer | None) -> list[dict]:
    from fastardiff.runtime.speculative import generate

    from .bench_cli import _interleaved

    modes = head_modes(gamma, early_stop, seed)
    num_classes = engines.manifest.config["num_classes"]
    classes = np.arange(batch) % num_classes
    stats = _interleaved(engines, classes, modes, repeats, batch)
    base_ms = 1000 * stats["baseline"].total_seconds / max(stats["baseline"].images, 1)
    rows = []
    for mode, st in stats.items():
        s = st.summary()
        total = max(st.total_seconds, 1e-12)
        ms = 1000 * st.total_seconds / max(st.images, 1)
        row = {"backend": backend, "batch": batch, "mode": mode,
               "gamma": modes[mode].gamma if modes[mode].mode == "speculative" else "-",
               "head": modes[mode].head, "ms/image": ms, "speedup": base_ms / ms,
               "head %": 100 * st.seconds.get("head", 0) / total,
               "draft %": 100 * st.seconds.get("draft", 0) / total,
               "verify %": 100 * st.seconds.get("verify", 0) / total,
               "decode %": 100 * st.seconds.get("decode", 0) / total,
               "outside engines %": 100 * st.seconds.get("host", 0) / total,
               "tok/target call": s["tokens_per_target_call"], "accept rate": s["acceptance_rate"],
               "draft calls/image": st.draft_calls / max(st.images, 1), "images": st.images, "summary": s,
               "class acc": float("nan"), "frechet": float("nan")}
        if scorer is not None and quality_images:
            labels = np.arange(quality_images) % num_classes
            images, _ = generate(engines, labels, modes[mode], max_batch=engines.manifest.max_batch)
            quality = scorer.score(images, labels)
            row.update(quality)
            row["class acc"], row["frechet"] = quality["class accuracy"], quality["frechet distance"]
        rows.append(row)
        log.info("%s batch %d %s: %.2f ms/image (%.2fx baseline)", backend, batch, mode, ms, base_ms / ms)
    return rows
