"""Model configs: one dataclass per family, a registry of named presets. Defaults are defined here only."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from fastardiff.errors import CheckpointError
from fastardiff.runtime.distribution import SigmaParams


@dataclass(frozen=True)
class DriftARConfig:
    """Shapes and hyper-parameters of a drift-ar model (target AR + draft AR + one-step decoder)."""

    name: str = "tiny-mnist"
    family: str = "drift-ar"
    dataset: str = "mnist"  # what the recipe trains it on; "mnist" is the only data set that ships here
    # image and tokens: an image is a grid of (image_size/patch)^2 continuous tokens of dimension token_dim
    image_size: int = 32
    channels: int = 1
    patch: int = 4
    token_dim: int = 16
    # conditioning: class ids 0..num_classes-1, id num_classes is the null class (classifier-free guidance)
    num_classes: int = 10
    class_names: tuple = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    n_cond: int = 1
    # AR transformers (target and draft share width and heads)
    width: int = 64  # tiny-mnist is trained on a shared 2-core CPU
    heads: int = 4
    mlp_ratio: int = 4
    # the papers' cost structure: a target much deeper than its draft (MAR-L/H 32-40 layers vs a 6-layer draft)
    target_layers: int = 12
    draft_layers: int = 1
    shallow_layer: int = 0  # draft layer whose entropy drives early stopping
    # one-step decoder
    decoder_width: int = 64
    decoder_layers: int = 3
    decoder_heads: int = 4
    # entropy-parameterised Gaussian (drift-ar Eq. 6/7); e_max comes from calibration
    sigma_max: float = 0.5
    tau_sigma: float = 2.0
    sigma_min: float = 1e-3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Positions the AR attends over: condition tokens then tokens x_0..x_{N-2} (x_{N-1} is never fed)."""
        return self.n_cond + self.num_tokens - 1

    @property
    def ar_out_dim(self) -> int:
        """Width of the AR's per-position output: the token mean here; a family with a token head (fast-ardiff:
        a conditioning vector z for its diffusion head) overrides it."""
        return self.token_dim

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pixels_per_token(self) -> int:
        return self.patch * self.patch * self.channels

    def entropy_layer(self, num_layers: int) -> int:
        """Index of the penultimate layer, whose attention entropy parameterises sigma."""
        return max(num_layers - 2, 0)

    def sigma_params(self, e_max: float) -> SigmaParams:
        """sigma(E) parameters of drift-ar Eq. 6 for this config and a calibrated E_max."""
        return SigmaParams(self.sigma_max, self.tau_sigma, e_max, self.sigma_min)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DriftARConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"config has unknown fields {unknown}; was it written by a newer fastardiff?")
        d = dict(d)
        if "class_names" in d:
            d["class_names"] = tuple(d["class_names"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if self.image_size % self.patch:
            problems.append(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.width % self.heads or self.decoder_width % self.decoder_heads:
            problems.append("width must be a multiple of heads")
        if len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.draft_layers < 1 or self.target_layers < 2:
            problems.append("need draft_layers >= 1 and target_layers >= 2")
        if problems:
            raise CheckpointError("invalid model config: " + "; ".join(problems))

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class FastARDiffConfig(DriftARConfig):  # re-exported by recipes/fast_ardiff.py (the family's module)
    """A fast-ardiff model: the drift-ar AR fields (its decoder fields unused: the decoder is unpatchify), the AR
    outputs a conditioning vector z per position and a per-token diffusion head (MAR's DiffLoss) turns z into a
    token: a teacher_steps-step DDPM teacher head and a student_steps-step distilled student head."""

    name: str = "tiny-mnist-fast-ardiff"
    family: str = "fast-ardiff"
    z_dim: int = 64            # AR output per position: the head's conditioning vector z
    head_width: int = 128
    head_depth: int = 3        # residual AdaLN blocks (MAR's SimpleMLPAdaLN)
    teacher_steps: int = 100   # T of the cosine schedule; the teacher samples with all T steps
    student_steps: int = 3     # 2..4: the distilled head's steps (step_schedule(T, student_steps))
    x0_clip: float = 1.5       # clamp of the head's x0 prediction (tokens are pixel patches in [-1, 1])

    @property
    def ar_out_dim(self) -> int:
        return self.z_dim

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.z_dim < 1 or self.head_width < 1 or self.head_depth < 1:
            problems.append("z_dim, head_width and head_depth must be >= 1")
        if self.teacher_steps < 2:
            problems.append(f"teacher_steps {self.teacher_steps} must be >= 2")
        if not 2 <= self.student_steps <= 4 or self.student_steps > self.teacher_steps:
            problems.append(f"student_steps {self.student_steps} must be in 2..4 and <= teacher_steps")
        if not self.x0_clip > 0:
            problems.append(f"x0_clip {self.x0_clip} must be > 0")
        if problems:
            raise CheckpointError("invalid fast-ardiff config: " + "; ".join(problems))


def _imagenet_like(name: str, width: int, heads: int, target_layers: int) -> DriftARConfig:
    """Paper-scale shapes (16x16 KL-16 latents, D=16, 256px images) for benchmarks with random weights."""
    return DriftARConfig(
        name=name, image_size=256, channels=3, patch=16, token_dim=16, num_classes=1000,
        class_names=tuple(f"class{i}" for i in range(1000)), dataset="imagenet", width=width, heads=heads,
        target_layers=target_layers, draft_layers=6, decoder_width=width, decoder_layers=6, decoder_heads=heads,
    )


CONFIGS: dict[str, DriftARConfig] = {
    "tiny-mnist": DriftARConfig(),
    # the previous shipped shape (4-layer target, 2-layer draft): quick to build and export in tests
    "tiny-mnist-small": DriftARConfig(name="tiny-mnist-small", target_layers=4, draft_layers=2),
    "mar-b-like": _imagenet_like("mar-b-like", 768, 12, 24),
    "mar-l-like": _imagenet_like("mar-l-like", 1024, 16, 32),
    "mar-h-like": _imagenet_like("mar-h-like", 1280, 16, 40),
    "transdiff-l-like": _imagenet_like("transdiff-l-like", 1024, 16, 32),
    "transdiff-h-like": _imagenet_like("transdiff-h-like", 1280, 20, 40),
    # fast-ardiff family (recipes/fast_ardiff.py): the shipped one has tiny-mnist's AR shapes
    "tiny-mnist-fast-ardiff": FastARDiffConfig(),
    # quick tests: a 2-layer target, a 1-block head, 10 teacher steps, a 2-step student
    "tiny-mnist-fast-ardiff-small": FastARDiffConfig(name="tiny-mnist-fast-ardiff-small", target_layers=2,
                                                     head_width=64, head_depth=1, teacher_steps=10,
                                                     student_steps=2),
}


def get_config(name: str) -> DriftARConfig:  # or a FastARDiffConfig (a subclass)
    if name not in CONFIGS:
        raise CheckpointError(f"unknown model config '{name}'; known: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name]


@dataclass
class Calibration:
    """Entropy statistics from the training set (stored in the checkpoint and the manifest)."""

    e_max: float = 1.0
    target_mean: float = 0.5
    target_std: float = 0.1
    draft_shallow_mean: float = 0.5
    draft_shallow_std: float = 0.1
    extra: dict = field(default_factory=dict)

    @property
    def tau_static(self) -> float:
        """fast-ardiff's static early-stop threshold on the draft's shallow-layer entropy."""
        return 0.3 * self.draft_shallow_mean - 0.1 * self.draft_shallow_std

    @property
    def tau_global(self) -> float:
        """drift-ar's global baseline 0.3 E[E^r] - 0.1 std(E^r) of the target's normalised entropy."""
        return 0.3 * self.target_mean - 0.1 * self.target_std

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tau_static"] = self.tau_static
        d["tau_global"] = self.tau_global
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        d = {k: v for k, v in d.items() if k not in ("tau_static", "tau_global")}
        return cls(**d)
