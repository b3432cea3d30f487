"""Checkpoint format: one torch file of plain tensors and JSON-able dicts (loadable with weights_only=True),
with its config also written as JSON beside it (model.pt -> model.json)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastardiff.errors import CheckpointError
from fastardiff.runtime.files import InputFileError, check_write, regular_file
from fastardiff.runtime.manifest import sha256_file as file_sha256  # noqa: F401  (one hashing helper)

from .config import Calibration, DriftARConfig
from .models import ARTransformer, DriftDecoder, build_models

CHECKPOINT_FORMAT = "fastardiff-checkpoint"
CHECKPOINT_VERSION = 1
FAMILY = "drift-ar"


@dataclass
class DriftARCheckpoint:
    config: DriftARConfig
    calibration: Calibration
    target: ARTransformer
    draft: ARTransformer
    decoder: DriftDecoder
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def eval(self) -> "DriftARCheckpoint":
        for m in (self.target, self.draft, self.decoder):
            m.eval().requires_grad_(False)
        return self


def atomic_torch_save(obj, path: Path) -> None:
    check_write(path)                            # never an input of the running command (runtime/files.py)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_checkpoint(path: str | Path, family: str, config, calibration, meta: dict, modules: dict,
                     json_default=None) -> Path:
    """The checkpoint format of every family: a weights_only-loadable torch file of the header, config,
    calibration, meta and each module's state_dict, with the header part written as JSON beside it."""
    path = Path(path)
    check_write(path.with_suffix(".json"))
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "family": family,
               "config": config.to_dict(), "calibration": calibration.to_dict(), "meta": meta}
    payload.update({name: module.state_dict() for name, module in modules.items()})
    atomic_torch_save(payload, path)
    side = {k: payload[k] for k in ("format", "version", "family", "config", "calibration", "meta")}
    path.with_suffix(".json").write_text(json.dumps(side, indent=2, sort_keys=True, default=json_default))
    return path


def save_checkpoint(path: str | Path, ckpt: DriftARCheckpoint) -> Path:
    return write_checkpoint(path, FAMILY, ckpt.config, ckpt.calibration, ckpt.meta,
                            {"target": ckpt.target, "draft": ckpt.draft, "decoder": ckpt.decoder})


def check_expected_config(path, config, expected_config) -> None:
    if expected_config is not None and config != expected_config:
        diff = sorted(k for k, v in expected_config.to_dict().items() if config.to_dict().get(k) != v)
        raise CheckpointError(f"'{path}' was trained with a different config (differs in {diff})")


def load_weights(path, payload: dict, modules: dict) -> None:
    """Each module's state_dict from the payload; a missing or mismatched one is one CheckpointError."""
    for name, module in modules.items():
        try:
            module.load_state_dict(payload[name])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"'{path}': weights of '{name}' do not match its config "
                                  f"({str(err).splitlines()[0][:160]})") from None


def read_payload(path: str | Path, expected_format: str = CHECKPOINT_FORMAT) -> dict:
    """Load a fastardiff torch file safely and check its header; errors name the problem and the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass --ckpt with the path of a .pt file "
                              "(the shipped default is recipes/checkpoints/tiny-mnist.pt)")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a directory; pass the checkpoint file itself (e.g. {path}/model.pt)")
    try:     # stat, never open, a FIFO or a device: reading one would block or drain it
        regular_file(path, "checkpoint", "pass a .pt file written by `fastardiff train`")
    except InputFileError as err:
        raise CheckpointError(str(err)) from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / foreign files
        first_line = (str(err).splitlines() or [""])[0][:120]
        raise CheckpointError(f"'{path}' is not a readable fastardiff checkpoint ({type(err).__name__}: "
                              f"{first_line}); pass a .pt file written by `fastardiff train` (the shipped default "
                              "is recipes/checkpoints/tiny-mnist.pt)") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise CheckpointError(f"'{path}' is not a {expected_format} file (no '{expected_format}' header); "
                              "train one with `fastardiff train` or use the shipped default")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"'{path}' has format version {payload.get('version')}, this fastardiff reads "
                              f"version {CHECKPOINT_VERSION}; re-export or upgrade fastardiff")
    return payload


FAMILIES = (FAMILY, "fast-ardiff")


def load_checkpoint(path: str | Path, attention_impl: str = "reference",
                    expected_config: DriftARConfig | None = None):
    """A DriftARCheckpoint or a FastARDiffCheckpoint (recipes/fast_ardiff.py), by the payload's family."""
    payload = read_payload(path)
    family = payload.get("family")
    if family == "fast-ardiff":
        from .fast_ardiff import load_fast_ardiff

        return load_fast_ardiff(payload, path, attention_impl, expected_config)
    if family != FAMILY:
        raise CheckpointError(f"'{path}' is a checkpoint of unknown model family '{family}'; this fastardiff "
                              f"reads {', '.join(FAMILIES)}")
    config = DriftARConfig.from_dict(payload["config"])
    check_expected_config(path, config, expected_config)
    target, draft, decoder = build_models(config, attention_impl)
    load_weights(path, payload, {"target": target, "draft": draft, "decoder": decoder})
    return DriftARCheckpoint(config, Calibration.from_dict(payload["calibration"]), target, draft, decoder,
                             payload.get("meta", {}), Path(path)).eval()


def default_checkpoint_path() -> Path:
    return Path(__file__).resolve().parent / "checkpoints" / "tiny-mnist.pt"


def default_classifier_path() -> Path:
    return Path(__file__).resolve().parent / "checkpoints" / "digit-classifier.pt"
