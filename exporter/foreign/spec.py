"""A model trained elsewhere, as the exporter sees it: the user's factory (named `package.module:function`, imported
as code the user trusts, never evaluated from a string), its weights (loaded as tensors only: `torch.load(...,
weights_only=True)` or safetensors), and the config the `foreign-gaussian` family writes into the manifest.

The factory returns a `ForeignModel`: the library's own module (x-transformers `ContinuousTransformerWrapper` /
`ContinuousAutoregressiveWrapper`, or a Hugging Face causal backbone with a per-token head) plus what the library
does not know about images: the patch geometry and the start token of each class (position 0 of every sequence).
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastardiff.errors import CheckpointError
from fastardiff.recipes.config import DriftARConfig

FAMILY = "foreign-gaussian"
_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ForeignModel:
    """What a factory returns. `model`: the library's module (weights are loaded into it); `start_tokens`
    [num_classes, token_dim]: the token fed at position 0 for each class (the prompt); `head` (Hugging Face
    backbones): the per-token head mapping a hidden state [..., hidden] to (mean, log-variance) [..., 2 D] of
    the next token, and `embed` its token embedding (token [..., D] -> inputs_embeds); `variance_floor`: the variance
    the library clamps at before its square root when sampling. Weights of a Hugging Face model are one state dict
    with keys 'model.*', 'embed.*' and 'head.*'."""

    model: object
    image_size: int
    patch: int
    start_tokens: object
    channels: int = 1
    class_names: tuple = ()
    head: object = None
    embed: object = None
    variance_floor: float = 1e-5
    dataset: str = "mnist"


@dataclass(frozen=True)
class ForeignGaussianConfig(DriftARConfig):
    """The manifest config of a foreign model: tokens are N(mean, diag(var)) from the model's own outputs (the
    engine's `mean` output is [mean, log variance], 2 D wide). heads / width describe the KV cache (key-value
    heads x head dim); `library`, `factory` and `architecture` record where the model came from."""

    name: str = "foreign"
    family: str = FAMILY
    library: str = ""
    factory: str = ""
    variance_floor: float = 1e-5
    architecture: dict = field(default_factory=dict)
    draft_layers: int = 1

    @property
    def ar_out_dim(self) -> int:
        return 2 * self.token_dim

    def validate(self) -> None:
        super().validate()
        if not self.variance_floor > 0:
            raise CheckpointError(f"variance_floor {self.variance_floor} must be > 0")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["architecture"] = dict(self.architecture)
        return d


def import_factory(ref: str):
    """The callable `package.module:function` (imported: the user's trusted code; the string is never evaluated)."""
    if not isinstance(ref, str) or not _FACTORY.match(ref):
        raise CheckpointError(f"--model '{ref}' is not of the form package.module:function (a factory returning a "
                              "fastardiff.exporter.foreign.ForeignModel)")
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise CheckpointError(f"--model '{ref}': module '{err.name}' is not importable (is its package installed, "
                              "or on PYTHONPATH?)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"--model '{ref}': module '{module_name}' has no function '{attr}'")
    return factory


def build_foreign(ref: str) -> ForeignModel:
    spec = import_factory(ref)()
    if not isinstance(spec, ForeignModel):
        raise CheckpointError(f"--model '{ref}' returned a {type(spec).__name__}, not a "
                              "fastardiff.exporter.foreign.ForeignModel (the library module plus the image geometry "
                              "and start tokens)")
    return spec


def read_state_dict(path) -> dict:
    """Tensors only: a safetensors file, or a torch file loaded with weights_only=True (a state dict, optionally
    under a 'state_dict' / 'model' key)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' does not exist; pass --ckpt with the model's state dict "
                              "(.pt or .safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for corrupt or foreign files
        first = (str(err).splitlines() or [""])[0][:160]
        raise CheckpointError(f"'{path}' is not a readable state dict ({type(err).__name__}: {first}); save one with "
                              "torch.save(model.state_dict(), path) or safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' is not a state dict of tensors; save one with "
                              "torch.save(model.state_dict(), path)")
    return state


def load_state(module, state: dict, path) -> None:
    """Load `state` into `module` strictly; the first missing, unexpected or mis-shaped key is one CheckpointError."""
    own = module.state_dict()
    if own and state and all(k.startswith("net.") for k in state) and not any(k.startswith("net.") for k in own):
        state = {k[len("net."):]: v for k, v in state.items()}   # saved from the autoregressive wrapper
    for key, value in own.items():
        if key not in state:
            raise CheckpointError(f"'{path}' does not fit the model: key '{key}' is missing")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"'{path}' does not fit the model: '{key}' has shape {list(state[key].shape)}, "
                                  f"the model's is {list(value.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointError(f"'{path}' does not fit the model: unexpected key '{extra[0]}'"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    module.load_state_dict(state, strict=True)


def foreign_config(spec: ForeignModel, library: str, ref: str, layers: int, kv_heads: int, head_dim: int,
                   architecture: dict) -> ForeignGaussianConfig:
    import torch

    start = torch.as_tensor(spec.start_tokens)
    classes = int(start.shape[0])
    names = tuple(spec.class_names) or tuple(f"class{i}" for i in range(classes))
    token_dim = spec.channels * spec.patch * spec.patch
    if start.ndim != 2 or start.shape[1] != token_dim:
        raise CheckpointError(f"start_tokens has shape {list(start.shape)}; it must be [classes, {token_dim}] "
                              f"(channels x patch x patch)")
    if layers < 2:
        raise CheckpointError(f"the model has {layers} attention layer(s); fastardiff exports models of 2 or more")
    cfg = ForeignGaussianConfig(
        name=f"foreign-{library}", dataset=spec.dataset, image_size=spec.image_size, channels=spec.channels,
        patch=spec.patch, token_dim=token_dim, num_classes=classes, class_names=names, n_cond=1,
        width=kv_heads * head_dim, heads=kv_heads, target_layers=layers, draft_layers=1, decoder_width=token_dim,
        decoder_heads=1, library=library, factory=ref, variance_floor=float(spec.variance_floor),
        architecture=architecture)
    cfg.validate()
    return cfg


def config_from_dict(d: dict) -> ForeignGaussianConfig:
    known = {f.name for f in dataclasses.fields(ForeignGaussianConfig)}
    d = {k: v for k, v in d.items() if k in known}
    d["class_names"] = tuple(d.get("class_names", ()))
    return ForeignGaussianConfig(**d)
