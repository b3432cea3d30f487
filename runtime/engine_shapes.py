"""The engines' input shapes at one point of their optimisation profile (the engine contract of runtime/engine.py),
as the TensorRT build (exporter/trt_target.py) and ONNX Runtime's TensorRT provider (runtime/backend_onnxruntime.py)
both give them: one definition of the profiles."""
from __future__ import annotations


def profile_proposals(corner: int, batch: int) -> int:
    """target_jacobi's residual proposals at a profile corner (0 min, 1 opt, 2 max): the whole range the runtime
    may feed (jacobi.residual_proposals, on a GPU or not), its GPU choice at the optimum."""
    from .jacobi import PROPOSAL_RANGE, residual_proposals

    return (PROPOSAL_RANGE[0], residual_proposals(batch, accelerator=True), PROPOSAL_RANGE[1])[corner]


def engine_input_shapes(config: dict, name: str, layers: int, batch: int, new_tokens: int, cache: int,
                        gamma: int = 0, proposals: int | None = None) -> dict:
    """Input name -> shape for one point of an engine's profile (the engine contract of runtime/engine.py);
    gamma > 0: a draft_rollout engine of that length (samples = rows at each profile corner)."""
    n_tokens = (config["image_size"] // config["patch"]) ** 2
    if name == "decoder":
        return {"tokens": (batch, n_tokens, config["token_dim"]), "entropy": (batch, n_tokens), "cond": (batch,)}
    if name.startswith("head_"):   # diffusion head: `batch` tokens, new_tokens = its steps (the profile's K axis)
        return {"z": (batch, config["z_dim"]), "traj_noise": (batch, new_tokens, config["token_dim"]),
                "temperature": (1,)}
    kv = (layers, batch, config["heads"], cache, config["width"] // config["heads"])
    shapes = {"tokens": (batch, new_tokens, config["token_dim"]), "lengths": (batch,), "k_cache": kv, "v_cache": kv,
              "cond": (batch,)}
    if gamma:
        shapes.update({"noise": (batch, gamma, config["token_dim"]), "threshold": (batch,), "max_drafts": (batch,),
                       "temperature": (1,), "cfg_scale": (1,)})
    if name == "target_jacobi":   # samples = rows; G = K - 1 guesses, W = K slots out, C residual proposals
        from .jacobi import residual_proposals

        c = residual_proposals(batch, accelerator=True) if proposals is None else proposals
        d, g, w = config["token_dim"], max(new_tokens - 1, 1), max(new_tokens, 2)
        shapes.update({"guess_mean": (batch, g, d), "guess_sigma": (batch, g), "num_guesses": (batch,),
                       "coins": (batch, g), "noise": (batch, w, d), "residual_noise": (batch, w, c, d),
                       "residual_coins": (batch, w, c), "temperature": (1,), "cfg_scale": (1,), "coupling": (1,)})
    return shapes
