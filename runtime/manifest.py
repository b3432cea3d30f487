"""manifest.json: the single source of truth the runtime reads about an engine directory."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastardiff.errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
ENGINE_NAMES = ("draft_step", "target_verify", "decoder")


@dataclass
class EngineEntry:
    file: str                      # relative to the engine dir, never absolute, never '..'
    sha256: str
    inputs: list = field(default_factory=list)    # names in call order
    outputs: list = field(default_factory=list)
    profile: dict = field(default_factory=dict)   # e.g. {"batch": [1, 2, 8], "K": [1, 5, 5], "cache": [0, 32, 64]}
    parity: dict = field(default_factory=dict)    # output name -> {"max_abs": .., "max_rel": ..}
    kind: str = ""                 # what the engine computes: its name, or "draft_rollout" for the rollouts
    gamma: int = 0                 # draft_rollout: the number of draft steps unrolled in the graph


@dataclass
class Manifest:
    backend: str                   # runtime backend registry key: "onnxruntime", "aoti", "tensorrt", "torch"
    family: str
    config: dict                   # the model config (DriftARConfig.to_dict())
    calibration: dict              # e_max, means/stds, tau_static, tau_global
    engines: dict                  # name -> EngineEntry
    precision: str = "fp32"
    device: str = "cpu"
    gamma: int = 4
    max_batch: int = 8
    config_hash: str = ""
    library_versions: dict = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)       # TensorRT: name, compute capability
    plugin: dict = field(default_factory=dict)    # TensorRT: plugin library file + sha256
    export: dict = field(default_factory=dict)    # tolerances, time, command
    format_version: int = FORMAT_VERSION

    def rollout_engines(self) -> dict[int, str]:
        """gamma -> engine name of every draft_rollout engine."""
        return {e.gamma: name for name, e in self.engines.items() if e.kind == "draft_rollout" and e.gamma >= 1}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["engines"] = {k: asdict(v) if isinstance(v, EngineEntry) else v for k, v in self.engines.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineError(f"{source} has format version {version}, this fastardiff reads version "
                              f"{FORMAT_VERSION}; re-export the engines with `fastardiff-export --force`")
        required = ("backend", "family", "config", "calibration", "engines")
        missing = [k for k in required if k not in d]
        if missing:
            raise EngineError(f"{source} is missing fields {missing}; re-export the engines")
        known = set(cls.__dataclass_fields__)
        m = cls(**{k: v for k, v in d.items() if k in known})
        engines = {}
        for name, entry in m.engines.items():
            engines[name] = EngineEntry(**entry) if isinstance(entry, dict) else entry
            _check_relative(engines[name].file, source)
        m.engines = engines
        return m


def _check_relative(file: str, source: str) -> None:
    p = Path(file)
    if p.is_absolute() or ".." in p.parts:
        raise EngineError(f"{source} names engine file '{file}' outside the engine directory; refusing to load it")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(engine_dir: str | Path) -> Manifest:
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory '{engine_dir}' does not exist; create it with "
                          f"`fastardiff-export --ckpt MODEL.pt --target onnx --out {engine_dir}`")
    path = engine_dir / MANIFEST_NAME
    if not path.exists():
        raise EngineError(f"'{engine_dir}' has no {MANIFEST_NAME}, so it is not an engine directory; "
                          "export one with `fastardiff-export`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineError(f"{path} is not valid JSON ({err}); re-export the engines") from None
    return Manifest.from_dict(data, str(path))


def verify_engine_files(engine_dir: str | Path, manifest: Manifest) -> None:
    """Every engine file exists and has the sha256 the manifest records (refuse tampered or stale files)."""
    engine_dir = Path(engine_dir)
    for name in ENGINE_NAMES:
        if name not in manifest.engines:
            raise EngineError(f"manifest in '{engine_dir}' has no '{name}' engine; re-export")
    for name, entry in manifest.engines.items():
        path = engine_dir / entry.file
        if not path.exists():
            raise EngineError(f"engine file '{path}' named by the manifest is missing; re-export with --force")
        if sha256_file(path) != entry.sha256:
            raise EngineError(f"engine file '{path}' does not match the sha256 in the manifest (modified or "
                              "stale); re-export with `fastardiff-export --force`")


def write_manifest(engine_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(engine_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return path
