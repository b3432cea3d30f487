"""What a generation asks for and what the model is: the request (`GenerationConfig`), its validation
(`check_request`), the model's shape as the loop sees it (`ModelShape`, from the manifest's config) and the
engines' verify limit. The loop itself is runtime/speculative.py."""
from __future__ import annotations

from dataclasses import dataclass

from fastardiff.errors import FastardiffError

from .capabilities import device_type  # noqa: F401  (re-exported)

# explicit Gaussian tokens (entropy-derived isotropic, or a foreign model's diagonal): Jacobi decoding is exact
EXACT_GAUSSIAN_FAMILIES = ("drift-ar", "foreign-gaussian")

MODES = ("speculative", "target", "draft")
DRAFTS = ("model", "jacobi")
# diffusion-head families' acceptance ratio (runtime/token_rules.py): "cspd" the paper's (final-step density ratio
# times the earlier steps' sigma ratios), "conditional" the final-step density ratio alone, exact given the
# trajectory noise draft and target share
ACCEPTANCE_RULES = ("cspd", "conditional")


# the smallest --temperature: temperature x sigma stays a normal float32 for any sigma a model has (>= 1e-30)
MIN_TEMPERATURE = 1e-6


class GenerationError(FastardiffError):
    """A generation request the model or its engines cannot serve (gamma, token count, batch)."""


@dataclass(frozen=True)
class GenerationConfig:
    mode: str = "speculative"
    gamma: int = 4
    early_stop: str = "static"
    temperature: float = 1.0
    cfg_scale: float = 1.0
    eta: float = 0.0              # percent of the N tokens sampled by the target alone before speculating
    seed: int = 0
    num_tokens: int | None = None  # stop after the first tokens (tests); None = all N, then decode
    draft: str = "model"          # speculative proposals: "model" (the draft engine) or "jacobi" (runtime/jacobi.py)
    coupling: bool = True         # jacobi: maximal coupling of new guesses with the old ones (False: independent)
    head: str = "student"         # diffusion-head families: which head engine samples tokens (student / teacher)
    shared_noise: bool = True     # diffusion-head families: draft and target share each token's noise trajectory
    inner_temperature: float = 1.0  # diffusion-head families: CSpD's inner temperature of the ratio (1: as stated)
    acceptance: str = "cspd"      # diffusion-head families: the acceptance ratio (ACCEPTANCE_RULES)
    engine_acceptance: bool | None = None   # model draft: accept in the target_jacobi engine (None: on device
                                            # backends only; speculative.in_engine_acceptance)
    alternative: str | None = None  # a proposal the run re-checks while it generates and switches to when measured
                                    # faster ("target", "jacobi:<L>", "model:<g>"; runtime/adaptive.py); None: off
    plan_rates: tuple = ()          # ((label, ms per token), ...) the plan measured: the run's prior of each kind's
                                    # speed until it measures them itself (adaptive.Adapter.ratio)


@dataclass(frozen=True)
class ModelShape:
    """What the loop needs to know about the model, read from the manifest's config dict."""

    n_cond: int
    num_tokens: int
    token_dim: int
    heads: int
    head_dim: int
    target_layers: int
    draft_layers: int
    num_classes: int

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        grid = c["image_size"] // c["patch"]
        return cls(c["n_cond"], grid * grid, c["token_dim"], c["heads"], c["width"] // c["heads"],
                   c["target_layers"], c["draft_layers"], c["num_classes"])

    @property
    def seq_len(self) -> int:
        return self.n_cond + self.num_tokens - 1


def check_request(gen: GenerationConfig, shape: ModelShape, max_verify_tokens: int | None = None) -> int:
    """Validate the request; returns the number of tokens to generate."""
    if gen.mode not in MODES:
        raise GenerationError(f"unknown mode '{gen.mode}'; choose one of {', '.join(MODES)}")
    if gen.draft not in DRAFTS:
        raise GenerationError(f"unknown draft '{gen.draft}'; choose one of {', '.join(DRAFTS)}")
    if gen.gamma < 1:
        raise GenerationError(f"--gamma must be at least 1 (got {gen.gamma}): it is the number of draft tokens "
                              "per target call")
    n = shape.num_tokens if gen.num_tokens is None else gen.num_tokens
    if not 1 <= n <= shape.num_tokens:
        raise GenerationError(f"asked for {n} tokens but the model generates N = {shape.num_tokens} per image")
    if gen.gamma + 1 > shape.num_tokens or (max_verify_tokens and gen.gamma + 1 > max_verify_tokens):
        limit = min(shape.num_tokens, max_verify_tokens or shape.num_tokens) - 1
        raise GenerationError(f"--gamma {gen.gamma} needs {gen.gamma + 1} tokens per target call, more than this "
                              f"model/engine allows (N = {shape.num_tokens}); use --gamma {limit} or less")
    if not 0 <= gen.eta < 100:
        raise GenerationError(f"--eta is a percentage of tokens in [0, 100) (got {gen.eta})")
    if not gen.temperature >= MIN_TEMPERATURE:
        raise GenerationError(f"--temperature {gen.temperature:g} is below {MIN_TEMPERATURE:g}: the tokens' sigma "
                              f"(temperature x the model's sigma) would underflow in float32 (a diffusion head's "
                              f"sigma to 0); use --temperature {MIN_TEMPERATURE:g} or more")
    if gen.acceptance not in ACCEPTANCE_RULES:
        raise GenerationError(f"unknown --acceptance '{gen.acceptance}'; choose one of {', '.join(ACCEPTANCE_RULES)}")
    if gen.acceptance == "conditional" and (not gen.shared_noise or gen.inner_temperature != 1.0):
        raise GenerationError("--acceptance conditional is exact only with the trajectory noise shared by draft and "
                              "target and the plain ratio: drop --shared-noise off / --inner-temperature, or use "
                              "--acceptance cspd")
    return n


def check_draft_supported(manifest, mode: str, draft: str) -> None:
    """The one rule for a proposal kind a request names (`--draft model|jacobi`, whatever `--gamma` says, and a
    cached plan's choice): GenerationError, naming the option and the fix, where these engines cannot run it."""
    if mode != "speculative":
        return
    if draft == "jacobi" and manifest.family not in EXACT_GAUSSIAN_FAMILIES:
        raise GenerationError(f"--draft jacobi needs explicit Gaussian tokens (family "
                              f"{' or '.join(EXACT_GAUSSIAN_FAMILIES)}); these engines are of family "
                              f"'{manifest.family}': use --draft model or --mode target")
    if draft == "model" and "draft_step" not in manifest.engines:
        if manifest.family == "foreign-gaussian":
            raise GenerationError("these engines have no draft model (a model exported with --model comes without "
                                  "one); run with --draft jacobi or --mode target")
        raise GenerationError("these engines have no draft model (exported with --no-draft); run with "
                              "--draft jacobi or --mode target, or re-export without --no-draft")


class LoopStalled(RuntimeError):
    """A decoding loop ran more rounds than it has tokens to make: a bug (every round emits a token per row)."""


def round_limit(n, total) -> int:
    """The most rounds a loop may take from lengths `n` to `total`: every round emits at least one token per
    unfinished row, so one per missing token (and one to spare)."""
    import numpy as np

    return int(np.max(np.asarray(total) - np.asarray(n), initial=0)) + 1


def next_round(rounds: int, limit: int, loop: str) -> int:
    """rounds + 1, or LoopStalled once past `limit` (round_limit): a stuck loop fails, never spins forever."""
    if rounds >= limit:
        raise LoopStalled(f"the {loop} loop ran {rounds} rounds without finishing its images (at most {limit}: every "
                          "round emits a token per unfinished image); this is a bug, please report it with the "
                          "command that ran")
    return rounds + 1


def rows_per_image(cfg_scale: float) -> int:
    """Engine rows one image takes in a call: 2 with guidance (conditional and unconditional), else 1."""
    return 2 if cfg_scale != 1.0 else 1


def samples_per_call(engines, cfg_scale: float, max_batch: int | None = None) -> int:
    """Images per engine call that fit the engines' profile (Manifest.max_batch_rows, and `max_batch` rows when
    given); GenerationError before any work when not even one image fits (guidance on engines exported for batch
    1: the two rows of an image share each call). Reproducibility: one seed's random stream is drawn call after
    call, so a run equals every run of the same engine files split into the same number of images per call;
    split differently, the same seed gives other, equally distributed images."""
    rows = engines.manifest.max_batch_rows
    if max_batch is not None:
        rows = min(rows, int(max_batch))
    per_image = rows_per_image(cfg_scale)
    if rows < per_image:
        raise GenerationError(f"--cfg-scale {cfg_scale:g} puts {per_image} rows (conditional and unconditional) of "
                              f"each image into one engine call, but these engines take at most {rows} row(s) per "
                              f"call (exported with --batch {rows}); re-export them with `fastardiff-export --batch "
                              f"{per_image}` or more, or run with --cfg-scale 1")
    return rows // per_image


def verify_limit(engines) -> int | None:
    entry = engines.manifest.engines.get("target_verify")
    profile = getattr(entry, "profile", None) or {}
    k = profile.get("K") or profile.get("new_tokens")
    return int(k[-1]) if k else None


def on_accelerator(engines) -> bool:
    """Whether the engines compute on a GPU (what the in-graph sampling's sizing follows: jacobi.residual_proposals;
    declared by the backend: runtime/capabilities.py)."""
    return engines.capabilities.accelerator


def in_engine_acceptance(engines, gen: GenerationConfig) -> bool:
    """Whether model-draft rounds verify and accept in one target_jacobi call (jacobi.accept_drafts_in_engine)
    instead of target_verify + the host's accept_drafts. gen.engine_acceptance None: where the loop runs on the
    engines' device (runtime/arrays.py) or their caches live on an accelerator (a CUDA backend: the acceptance runs
    there and only the accepted counts, the next tokens and their entropies come back); on host loops over CPU
    engines the host's numpy acceptance measured faster (the sampling nodes cost more than the numpy they replace:
    0.86x at batch 1, 0.87x at batch 8). Needs plain Gaussian tokens (drift-ar), the plain ratio and the engine
    (GenerationError when forced without them)."""
    if gen.engine_acceptance is False or gen.mode != "speculative" or gen.draft != "model":
        return False
    able = (engines.manifest.family == "drift-ar" and gen.inner_temperature == 1.0
            and "target_jacobi" in engines.manifest.engines)
    if gen.engine_acceptance is None:     # where the loop runs on the device, or the caches live on an accelerator
        caps = engines.capabilities
        return able and (caps.loop_device is not None or device_type(caps.cache_device) != "cpu")
    if not able:
        raise GenerationError("engine acceptance needs a drift-ar model, inner temperature 1 and engines with "
                              "target_jacobi (re-export them); leave it to the default or turn it off")
    return True
