"""Worked example of a Hugging Face backbone: a tiny `LlamaModel` (or `Qwen2Model`) fed `inputs_embeds`, with a
token embedding and a per-token Gaussian head (the shape of NextStep-1: a Qwen2.5 backbone with a per-token head),
trained on MNIST patch tokens with the Gaussian NLL; one state dict with keys 'model.*', 'embed.*', 'head.*'.

    python -m fastardiff.recipes.hf_llama_mnist --out llama-digits.pt
    fastardiff-export --model fastardiff.recipes.hf_llama_mnist:digits --ckpt llama-digits.pt --target onnx --out ll

`sample` is the library-side reference sampler: the backbone's own forward with its DynamicCache, token by token.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .xtransformers_mnist import DIGITS, IMAGE_SIZE, PATCH, TOKEN_DIM, class_start_tokens, save_state_dict, sequences

log = logging.getLogger("fastardiff.recipes")


def build(kind: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> nn.Module:
    """The trainable module: .model (the HF backbone), .embed (token -> hidden), .head (hidden -> [mean, log var])."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  vocab_size=1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    backbone = (LlamaModel(LlamaConfig(**common)) if kind == "llama"
                else Qwen2Model(Qwen2Config(**common, use_sliding_window=False)))
    holder = nn.Module()
    holder.model, holder.embed, holder.head = backbone, nn.Linear(TOKEN_DIM, hidden), nn.Linear(hidden, 2 * TOKEN_DIM)
    return holder


def spec(holder):
    from fastardiff.exporter.foreign import ForeignModel

    return ForeignModel(model=holder.model, embed=holder.embed, head=holder.head, image_size=IMAGE_SIZE, patch=PATCH,
                        start_tokens=class_start_tokens(), class_names=DIGITS)


def digits():
    """`--model fastardiff.recipes.hf_llama_mnist:digits`: 2-layer Llama, hidden 64, grouped-query attention."""
    torch.manual_seed(0)
    return spec(build("llama"))


def digits_qwen2():
    torch.manual_seed(0)
    return spec(build("qwen2"))


def forward(holder, inputs: torch.Tensor):
    """(mean, log variance) [B, T, D] of each next token, by the backbone's own forward."""
    hidden = holder.model(inputs_embeds=holder.embed(inputs), use_cache=False).last_hidden_state
    mean, log_var = holder.head(hidden).chunk(2, dim=-1)
    return mean, log_var


def train(holder, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True) -> float:
    from tqdm import tqdm

    from .data import BatchSampler, load_digit_split

    torch.manual_seed(seed)
    split = load_digit_split()
    data = sequences(split.train_images, split.train_labels)
    sampler = BatchSampler(len(data), batch, seed)
    opt = torch.optim.AdamW(holder.parameters(), lr=lr, weight_decay=0.0)
    holder.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="train llama", unit="step", disable=not progress, leave=False):
        seq = data[sampler.next()]
        mean, log_var = forward(holder, seq[:, :-1])
        loss = nn.functional.gaussian_nll_loss(mean, seq[:, 1:], log_var.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    holder.eval()
    return float(loss.detach())


def cache_argument(backbone, cache) -> dict:
    """The backbone's KV-cache keyword: `cache` where this transformers release has it (5.25 deprecates
    `past_key_values`, to be removed in 5.40), else `past_key_values`."""
    import inspect

    name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def sample(holder, classes: torch.Tensor, tokens: int, temperature: float = 1.0, floor: float = 1e-5):
    """The reference sampler on the library's side: the backbone with its own DynamicCache, one token per call,
    x ~ N(mean, max(var, floor) T^2) per dimension."""
    from transformers import DynamicCache

    cache = DynamicCache()
    x = class_start_tokens()[classes].unsqueeze(1)
    out = []
    for _ in range(tokens):
        hidden = holder.model(inputs_embeds=holder.embed(x), use_cache=True,
                              **cache_argument(holder.model, cache)).last_hidden_state
        mean, log_var = holder.head(hidden[:, -1:]).chunk(2, dim=-1)
        x = mean + log_var.exp().clamp(min=floor).sqrt() * temperature * torch.randn_like(mean)
        out.append(x)
    return torch.cat(out, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--kind", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    holder = build(args.kind)
    start = time.perf_counter()
    loss = train(holder, args.steps, seed=args.seed)
    save_state_dict(holder, args.out)
    log.info("trained %d steps in %.0f s (last loss %.3f); wrote %s", args.steps, time.perf_counter() - start, loss,
             args.out)


if __name__ == "__main__":
    main()
