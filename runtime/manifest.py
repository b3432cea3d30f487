"""manifest.json: the single source of truth the runtime reads about an engine directory.

Loading validates it against a schema (pydantic, strict types) before anything reads it: the format version
first, then every field's presence, type and range, then consistency (heads divide width, patch divides the
image, one class name per class, the three core engines present, rollout lengths unique, engine files inside the
directory and present). Any problem is one EngineError naming the field and the fix.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastardiff.errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
ENGINE_NAMES = ("draft_step", "target_verify", "decoder")
REQUIRED_ENGINES = ("target_verify", "decoder")   # draft_step is left out by `fastardiff-export --no-draft`
PRECISIONS = ("fp32", "fp16", "bf16")
HEAD_FAMILIES = ("fast-ardiff",)   # families whose tokens come from a diffusion-head engine (kind "head")
REEXPORT = "re-export the engines with `fastardiff-export --force`"
# the in-graph residual rule of the target_jacobi engines this runtime pairs with its host continuation
# (runtime/jacobi.py finish_residuals): the reflected residual's second stage
JACOBI_RESIDUAL = "reflected"
JACOBI_PRIOR = "jacobi_prior"      # calibration.extra key of the first Jacobi window's proposal (Manifest.jacobi_prior)


# Upper bounds of the manifest's sizes and statistics: far above any real model (the paper's largest: 256 tokens of
# 16, width ~1280, 40 layers), low enough that nothing derived from them overflows or asks for absurd memory.
# A causal-normalized entropy lies in [0, 1]; E_max / tau_sigma is an exponent of sigma(E) (float32 overflows past 88).
LIMITS = {"image_size": 16384, "channels": 64, "dim": 65536, "classes": 1_000_000, "n_cond": 4096, "width": 65536,
          "heads": 1024, "mlp_ratio": 64, "layers": 1024, "tokens": 65536, "batch": 4096, "profile": 1 << 20,
          "steps": 10000, "sigma": 1000.0, "entropy": 64.0, "exponent": 80.0, "statistic": 1000.0}


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
    steps: int = 0                 # head (diffusion-head families): denoising steps unrolled in the graph
    cache_layers: int = 0          # in-place engines with one cache buffer per layer (runtime/engine.py
                                   # per_layer_io): their layer count; 0: the contract's stacked [L,...] caches
    residual: str = ""             # target_jacobi: its in-graph residual rule (JACOBI_RESIDUAL: the reflected
                                   # residual); "" in exports before it, which the loader leaves unused


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

    @property
    def jacobi_prior(self):
        """The first Jacobi window's proposal (calibration.extra.jacobi_prior, exporter/calibrate.py): per class and
        token position the Gaussian (mean [C, N, D], sigma [C, N]) fitted to the target's own p there, float32;
        None when the calibration has none. Decoded and checked once per table object (EngineError naming the
        fix)."""
        table = (self.calibration.get("extra") or {}).get(JACOBI_PRIOR)
        if not table:
            return None
        parsed = self.__dict__.get("_jacobi_prior")
        if parsed is not None and parsed[0] is table:
            return parsed[1]
        from .generation import ModelShape

        shape = ModelShape.from_config(self.config)
        prior = decode_prior(table, (shape.num_classes, shape.num_tokens, shape.token_dim))
        self.__dict__["_jacobi_prior"] = (table, prior)
        return prior

    @property
    def max_batch_rows(self) -> int:
        """The most rows one engine call takes: `max_batch` and the top of every engine's batch profile (an engine
        exported for batch 1 takes one row). Guidance puts two rows (conditional, unconditional) of each image into
        a call, so a call holds max_batch_rows // 2 guided images (runtime/generation.py samples_per_call)."""
        tops = [int(e.profile["batch"][-1]) for e in self.engines.values()
                if isinstance(e, EngineEntry) and e.profile.get("batch")]
        return max(1, min([int(self.max_batch), *tops]))

    def rollout_engines(self) -> dict[int, str]:
        """gamma -> engine name of every draft_rollout engine."""
        return {e.gamma: name for name, e in self.engines.items() if e.kind == "draft_rollout" and e.gamma >= 1}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["engines"] = {k: asdict(v) if isinstance(v, EngineEntry) else v for k, v in self.engines.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        """Validate `d` (see validate_manifest_dict) and build the dataclasses. Unknown keys of the manifest and
        of its engine entries are ignored; config and calibration dicts are kept as written."""
        validate_manifest_dict(d, source)
        known = set(cls.__dataclass_fields__)
        m = cls(**{k: v for k, v in d.items() if k in known})
        entry_fields = set(EngineEntry.__dataclass_fields__)
        m.engines = {name: EngineEntry(**{k: v for k, v in entry.items() if k in entry_fields})
                     for name, entry in m.engines.items()}
        return m


# ----------------------------------------------------------------------------------------------------------------
# schema


def encode_prior(mean, sigma, **about) -> dict:
    """calibration.extra.jacobi_prior: mean [C, N, D] and sigma [C, N] as base64 float32 (little-endian), compact
    and exact in a JSON manifest, with `about` (how it was measured) beside them."""
    mean, sigma = np.asarray(mean, "<f4"), np.asarray(sigma, "<f4")
    return {"shape": list(mean.shape), "dtype": "float32", "mean": base64.b64encode(mean.tobytes()).decode("ascii"),
            "sigma": base64.b64encode(sigma.tobytes()).decode("ascii"), **about}


def decode_prior(table, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(mean [C, N, D], sigma [C, N]) float32 from an encode_prior table, which must hold `shape` = (C, N, D), finite
    values and sigma > 0 (EngineError naming the fix otherwise)."""
    mean = sigma = None
    try:
        if table.get("dtype") == "float32" and tuple(table.get("shape", ())) == tuple(shape):
            mean = np.frombuffer(base64.b64decode(table["mean"], validate=True), "<f4").reshape(shape)
            sigma = np.frombuffer(base64.b64decode(table["sigma"], validate=True), "<f4").reshape(shape[:2])
    except (AttributeError, KeyError, TypeError, ValueError):     # not a dict, a field missing, bad base64 or size
        mean = sigma = None
    if mean is None or not (np.isfinite(mean).all() and np.isfinite(sigma).all() and (sigma > 0).all()):
        raise EngineError(f"calibration.extra.{JACOBI_PRIOR} is not a float32 prior of shape {list(shape)} (base64 "
                          f"mean and sigma, finite, sigma > 0); run `fastardiff calibrate --measure jacobi` on the "
                          f"checkpoint and {REEXPORT}")
    return mean.astype(np.float32), sigma.astype(np.float32)


def _bad(field_name: str, message: str):
    """A consistency error on `field_name` inside the model being validated (its path is added to the loc)."""
    from pydantic_core import PydanticCustomError

    return PydanticCustomError("inconsistent", "{message}", {"message": message, "field": field_name})


def _relative_file(value: str) -> str:
    p = Path(value)
    if p.is_absolute() or ".." in p.parts or "\x00" in value or value.strip() in ("", "."):
        raise ValueError("must be a relative path inside the engine directory, without '..'")
    return value


@functools.cache
def _schema():
    """The pydantic model of format version 1 (built on first use: importing the runtime stays cheap)."""
    from typing import Annotated, Literal, Optional

    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

    strict = ConfigDict(strict=True, extra="ignore")
    open_ = ConfigDict(strict=True, extra="allow")
    Text = Annotated[str, Field(min_length=1, max_length=4096)]
    PosInt = Annotated[int, Field(ge=1)]
    NonNegInt = Annotated[int, Field(ge=0)]
    Finite = Annotated[float, Field(allow_inf_nan=False)]
    PosFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
    NonNegFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    RelFile = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_relative_file)]

    def Sized(high):              # a positive int no larger than `high` (LIMITS: past them no engine is real)
        return Annotated[int, Field(ge=1, le=high)]

    Bounded = Annotated[float, Field(ge=-LIMITS["statistic"], le=LIMITS["statistic"], allow_inf_nan=False)]

    class ModelConfig(BaseModel):
        model_config = open_
        name: Text
        family: Text
        dataset: str
        image_size: Sized(LIMITS["image_size"])
        channels: Sized(LIMITS["channels"])
        patch: Sized(LIMITS["image_size"])
        token_dim: Sized(LIMITS["dim"])
        num_classes: Sized(LIMITS["classes"])
        class_names: Annotated[list[Text], Field(min_length=1)]
        n_cond: Sized(LIMITS["n_cond"])
        width: Sized(LIMITS["width"])
        heads: Sized(LIMITS["heads"])
        mlp_ratio: Sized(LIMITS["mlp_ratio"])
        target_layers: Annotated[int, Field(ge=2, le=LIMITS["layers"])]
        draft_layers: Sized(LIMITS["layers"])
        shallow_layer: NonNegInt
        decoder_width: Sized(LIMITS["width"])
        decoder_layers: Sized(LIMITS["layers"])
        decoder_heads: Sized(LIMITS["heads"])
        sigma_max: Annotated[float, Field(gt=0, le=LIMITS["sigma"], allow_inf_nan=False)]
        tau_sigma: Annotated[float, Field(gt=0, le=LIMITS["sigma"], allow_inf_nan=False)]
        sigma_min: Annotated[float, Field(gt=0, le=LIMITS["sigma"], allow_inf_nan=False)]

        @model_validator(mode="after")
        def consistent(self):
            if self.width % self.heads:
                raise _bad("heads", f"{self.heads} must divide width ({self.width})")
            if self.decoder_width % self.decoder_heads:
                raise _bad("decoder_heads", f"{self.decoder_heads} must divide decoder_width ({self.decoder_width})")
            if self.image_size % self.patch:
                raise _bad("patch", f"{self.patch} must divide image_size ({self.image_size})")
            if len(self.class_names) != self.num_classes:
                raise _bad("class_names", f"has {len(self.class_names)} names but num_classes is {self.num_classes}")
            lowered = [n.lower() for n in self.class_names]
            if len(set(lowered)) != len(lowered):
                raise _bad("class_names", "repeats a name (prompts match names case-insensitively)")
            if self.shallow_layer >= self.draft_layers:
                raise _bad("shallow_layer", f"{self.shallow_layer} must be a draft layer, below draft_layers ({self.draft_layers})")
            if self.sigma_min >= self.sigma_max:
                raise _bad("sigma_min", f"{self.sigma_min} must be below sigma_max ({self.sigma_max})")
            if (self.image_size // self.patch) ** 2 < 2:
                raise _bad("patch", f"{self.patch} leaves fewer than 2 tokens in an image of {self.image_size} px")
            if (self.image_size // self.patch) ** 2 > LIMITS["tokens"]:
                raise _bad("patch", f"{self.patch} makes {(self.image_size // self.patch) ** 2} tokens per image of "
                                    f"{self.image_size} px, more than {LIMITS['tokens']}")
            z_dim = self.model_extra.get("z_dim") if self.model_extra else None
            if z_dim is not None and (type(z_dim) is not int or not 1 <= z_dim <= LIMITS["dim"]):
                raise _bad("z_dim", f"must be an integer in [1, {LIMITS['dim']}] (got {z_dim!r})")
            return self

    class CalibrationModel(BaseModel):
        model_config = open_
        e_max: Annotated[float, Field(gt=0, le=LIMITS["entropy"], allow_inf_nan=False)]
        target_mean: Bounded
        target_std: Annotated[float, Field(ge=0, le=LIMITS["statistic"], allow_inf_nan=False)]
        draft_shallow_mean: Bounded
        draft_shallow_std: Annotated[float, Field(ge=0, le=LIMITS["statistic"], allow_inf_nan=False)]
        tau_static: Bounded
        tau_global: Bounded
        extra: dict = {}

    class EngineModel(BaseModel):
        model_config = strict
        file: RelFile
        sha256: Sha256
        inputs: list[Text] = []
        outputs: list[Text] = []
        profile: dict[Text, Annotated[list[Annotated[int, Field(ge=0, le=LIMITS["profile"])]],
                                      Field(min_length=1, max_length=3)]] = {}
        parity: dict = {}
        kind: str = ""
        gamma: Annotated[int, Field(ge=0, le=LIMITS["tokens"])] = 0
        steps: Annotated[int, Field(ge=0, le=LIMITS["steps"])] = 0
        cache_layers: Annotated[int, Field(ge=0, le=LIMITS["layers"])] = 0
        residual: Annotated[str, Field(max_length=64)] = ""

        @model_validator(mode="after")
        def consistent(self):
            if self.cache_layers and ("k_cache_0" not in self.inputs or len(self.inputs) < 2 * self.cache_layers):
                raise _bad("cache_layers", f"an engine with {self.cache_layers} per-layer caches lists them in "
                                           f"its inputs (got {self.inputs})")
            if self.kind == "draft_rollout" and self.gamma < 1:
                raise _bad("gamma", f"a draft_rollout engine needs gamma >= 1 (got {self.gamma})")
            if self.kind == "head" and self.steps < 1:
                raise _bad("steps", f"a head engine needs steps >= 1 (got {self.steps})")
            for axis, values in self.profile.items():
                if values != sorted(values):
                    raise _bad(f"profile.{axis}", f"{values} must be min <= opt <= max")
            return self

    class PluginModel(BaseModel):
        model_config = open_
        file: Optional[RelFile] = None
        sha256: Optional[Sha256] = None

    class ManifestModel(BaseModel):
        model_config = strict
        format_version: Literal[FORMAT_VERSION]
        backend: Text
        family: Text
        config: ModelConfig
        calibration: CalibrationModel
        engines: Annotated[dict[Text, EngineModel], Field(min_length=1)]
        precision: Literal[PRECISIONS] = "fp32"
        device: Text = "cpu"
        gamma: Sized(LIMITS["tokens"]) = 4
        max_batch: Sized(LIMITS["batch"]) = 8
        config_hash: str = ""
        library_versions: dict[str, Optional[str]] = {}
        gpu: dict = {}
        plugin: PluginModel = PluginModel()
        export: dict = {}

        @model_validator(mode="after")
        def consistent(self):
            missing = [n for n in REQUIRED_ENGINES if n not in self.engines]
            if missing:
                raise _bad("engines", f"has no {', '.join(repr(n) for n in missing)} engine (every engine dir needs "
                                 f"{', '.join(REQUIRED_ENGINES)})")
            if "draft_step" not in self.engines and any(e.kind == "draft_rollout" for e in self.engines.values()):
                raise _bad("engines", "lists draft_rollout engines but no 'draft_step' engine")
            seen: dict[int, str] = {}
            for name, e in self.engines.items():
                if e.kind == "draft_rollout":
                    if e.gamma in seen:
                        raise _bad(f"engines.{name}.gamma", f"{e.gamma} repeats the rollout length of '{seen[e.gamma]}'")
                    seen[e.gamma] = name
            heads = [name for name, e in self.engines.items() if e.kind == "head"]
            if self.family in HEAD_FAMILIES and not heads:
                raise _bad("engines", f"family '{self.family}' samples tokens with a diffusion head but no "
                                      "engine has kind 'head'")
            if self.family in HEAD_FAMILIES and "z_dim" not in self.config.model_extra:
                raise _bad("config.z_dim", f"is missing: family '{self.family}' needs the width of its AR output")
            for name, e in self.engines.items():     # in-place engines: one cache buffer per layer of their model
                layers = {"target": self.config.target_layers, "draft": self.config.draft_layers}.get(name.split("_")[0])
                if e.cache_layers and layers is not None and e.cache_layers != layers:
                    which = "target_layers" if name.startswith("target") else "draft_layers"
                    raise _bad(f"config.{which}", f"is {layers} but engine '{name}' has {e.cache_layers} per-layer "
                                                  "caches: the manifest does not describe its engine files")
            files = [Path(e.file).as_posix() for e in self.engines.values()]
            if len(set(files)) != len(files):
                raise _bad("engines", "two engines name the same file")
            n = (self.config.image_size // self.config.patch) ** 2
            ratio = self.calibration.e_max / self.config.tau_sigma
            if ratio > LIMITS["exponent"]:      # sigma(E) divides by e^(E_max / tau_sigma) - 1: it must stay finite
                raise _bad("calibration.e_max", f"{self.calibration.e_max:g} over config.tau_sigma "
                           f"{self.config.tau_sigma:g} is {ratio:g}; sigma(E) needs it at most {LIMITS['exponent']}")
            if self.gamma + 1 > n:
                raise _bad("gamma", f"{self.gamma} needs {self.gamma + 1} tokens per verify but the model has N = {n}")
            return self

    return ManifestModel


def _describe(error: dict) -> str:
    """One pydantic error -> "field 'config.heads': must be ... (got ...)"."""
    loc = [str(p) for p in error.get("loc", ())]
    ctx = error.get("ctx") or {}
    if error.get("type") == "inconsistent" and ctx.get("field"):
        loc.append(ctx["field"])
    loc = ".".join(loc)
    kind = error.get("type", "")
    where = f"field '{loc}'" if loc else "the manifest"
    if kind == "missing":
        return f"{where} is missing"
    msg = error.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif kind == "string_pattern_mismatch" and "sha256" in loc:
        msg = "must be a sha256 digest (64 lowercase hex digits)"
    elif msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be "):]
    else:
        msg = msg if kind == "inconsistent" else msg[:1].lower() + msg[1:]
    got = ""
    if kind not in ("value_error", "inconsistent") and "input" in error and not isinstance(error["input"], (dict, type(None))):
        text = repr(error["input"])
        got = f" (got {text if len(text) <= 60 else text[:57] + '...'})"
    return f"{where}: {msg}{got}"


def validate_manifest_dict(d, source: str = "manifest") -> None:
    """Raise EngineError (one line: the field, the problem, the fix) unless `d` is a valid manifest."""
    if not isinstance(d, dict):
        raise EngineError(f"{source} is not a JSON object (got {type(d).__name__}); {REEXPORT}")
    version = d.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        what = "no format_version" if "format_version" not in d else f"format version {version!r}"
        raise EngineError(f"{source} has {what}, this fastardiff reads version {FORMAT_VERSION}; {REEXPORT}")
    from pydantic import ValidationError

    try:
        _schema().model_validate(d)
    except ValidationError as err:
        errors = err.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise EngineError(f"{source}: {_describe(errors[0])}{more}; {REEXPORT}") from None


def _check_relative(file: str, source: str) -> None:
    try:
        _relative_file(file)
    except ValueError as err:
        raise EngineError(f"{source}: {err}") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(engine_dir: str | Path) -> Manifest:
    engine_dir = Path(engine_dir)
    if engine_dir.exists() and not engine_dir.is_dir():
        raise EngineError(f"'{engine_dir}' is a file, not an engine directory; pass the directory written by "
                          "`fastardiff-export --out DIR`")
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory '{engine_dir}' does not exist; create it with "
                          f"`fastardiff-export --ckpt MODEL.pt --target onnx --out {engine_dir}`")
    path = engine_dir / MANIFEST_NAME
    if not path.exists():
        raise EngineError(f"'{engine_dir}' has no {MANIFEST_NAME}, so it is not an engine directory; "
                          "export one with `fastardiff-export`")
    _regular(path, "manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"{path} is not valid JSON ({err}); {REEXPORT}") from None
    except OSError as err:
        raise EngineError(f"cannot read {path} ({err.strerror}); check its permissions") from None
    except RecursionError:
        raise EngineError(f"{path} is nested too deeply to be a manifest; {REEXPORT}") from None
    manifest = Manifest.from_dict(data, str(path))
    for name, entry in manifest.engines.items():
        if not (engine_dir / entry.file).exists():
            raise EngineError(f"{path}: field 'engines.{name}.file' names '{entry.file}', which is missing from "
                              f"'{engine_dir}'; {REEXPORT}")
        _regular(engine_dir / entry.file, f"engine file of '{name}'")
    if (manifest.plugin or {}).get("file") and (engine_dir / manifest.plugin["file"]).exists():
        _regular(engine_dir / manifest.plugin["file"], "plugin library")
    return manifest


def _regular(path: Path, what: str) -> None:
    """EngineError unless `path` is a regular file (stat only: a FIFO is never opened)."""
    from .files import InputFileError, regular_file

    try:
        regular_file(path, what, REEXPORT)
    except InputFileError as err:
        raise EngineError(str(err)) from None


def verify_engine_files(engine_dir: str | Path, manifest: Manifest) -> None:
    """Every engine file exists and has the sha256 the manifest records (refuse tampered or stale files)."""
    engine_dir = Path(engine_dir)
    for name in REQUIRED_ENGINES:
        if name not in manifest.engines:
            raise EngineError(f"manifest in '{engine_dir}' has no '{name}' engine; re-export")
    for name, entry in manifest.engines.items():
        path = engine_dir / entry.file
        if not path.exists():
            raise EngineError(f"engine file '{path}' named by the manifest is missing; re-export with --force")
        _regular(path, f"engine file of '{name}'")
        if sha256_file(path) != entry.sha256:
            raise EngineError(f"engine file '{path}' does not match the sha256 in the manifest (modified or "
                              "stale); re-export with `fastardiff-export --force`")


def write_manifest(engine_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(engine_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return path


def config_dims(config: dict, engine: str, name: str, rank: int) -> dict[int, tuple[int, str]]:
    """axis -> (size, config field) that the model config fixes for input `name` (of `rank` axes) of `engine`:
    token and head dims, KV heads and layers, the decoder's token count (the axes that batch, K and the cache length
    leave free)."""
    n_tokens = (config["image_size"] // config["patch"]) ** 2
    heads, head_dim = config["heads"], config["width"] // config["heads"]
    layers = config["target_layers"] if engine.startswith("target") else config["draft_layers"]
    token_dim = (config["token_dim"], "token_dim")
    if engine == "decoder":
        return {"tokens": {1: (n_tokens, "image_size / patch squared"), 2: token_dim},
                "entropy": {1: (n_tokens, "image_size / patch squared")}}.get(name, {})
    if name in ("tokens", "guess_mean", "noise", "traj_noise", "residual_noise"):
        return {rank - 1: token_dim}
    if name == "z" and "z_dim" in config:
        return {rank - 1: (config["z_dim"], "z_dim")}
    if name in ("k_cache", "v_cache") and rank == 5:
        return {0: (layers, "target_layers" if engine.startswith("target") else "draft_layers"),
                2: (heads, "heads"), 4: (head_dim, "width / heads")}
    if name.startswith(("k_cache_", "v_cache_")) and rank == 4:
        return {1: (heads, "heads"), 3: (head_dim, "width / heads")}
    return {}


def check_input_dims(manifest: Manifest, engine: str, shapes: dict) -> None:
    """EngineError unless every input dim the model config fixes matches the engine file's (`shapes`: input name ->
    its dims, ints where static, anything else where dynamic): a manifest whose config does not describe its engine
    files (heads, widths, token counts) is refused at load, not in the middle of a run."""
    for name, dims in shapes.items():
        dims = list(dims or ())
        for axis, (size, field_name) in config_dims(manifest.config, engine, name, len(dims)).items():
            got = dims[axis] if axis < len(dims) else None
            if isinstance(got, int) and got != size:
                raise EngineError(f"engine '{engine}' input '{name}' has {got} on axis {axis}, but the manifest's "
                                  f"config gives {size} (config.{field_name}): the manifest does not describe these "
                                  f"engine files; {REEXPORT}")
