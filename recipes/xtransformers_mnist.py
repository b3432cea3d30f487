"""Worked example of a model trained elsewhere: an x-transformers continuous AR over MNIST digits as patch tokens,
trained by the library's own `ContinuousAutoregressiveWrapper` (Gaussian NLL), saved as a plain state dict.

Each sequence is [start token of the class, x_0 .. x_{N-1}]: the start token (`class_start_tokens`, a one-hot
pattern in token space) is the prompt, as `generate(start_tokens, N)` takes it. Tokens are the project's identity
patch tokens (recipes/data.py: 32x32 padded digits in [-1, 1], 4x4 patches, N = 64, D = 16).

    python -m fastardiff.recipes.xtransformers_mnist --out xt-digits.pt    # train (1200 steps: 20 min, busy 2-core CPU)
    fastardiff-export --model fastardiff.recipes.xtransformers_mnist:digits --ckpt xt-digits.pt --target onnx --out xt
    fastardiff-run --engine xt --prompt 3,7 --mode target
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE, PATCH, TOKEN_DIM = 32, 4, 16
NUM_TOKENS = (IMAGE_SIZE // PATCH) ** 2

log = logging.getLogger("fastardiff.recipes")


def class_start_tokens(num_classes: int = 10, dim: int = TOKEN_DIM) -> torch.Tensor:
    """[num_classes, dim]: class c's start token is +1 at coordinate c, -1 elsewhere (a token-space prompt)."""
    return torch.eye(num_classes, dim) * 2.0 - 1.0


def build(dim: int = 64, depth: int = 4, heads: int = 4, **options):
    """The library's own modules: ContinuousAutoregressiveWrapper(ContinuousTransformerWrapper(..., Decoder))."""
    from x_transformers import ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper, Decoder

    net = ContinuousTransformerWrapper(dim_in=TOKEN_DIM, dim_out=TOKEN_DIM, max_seq_len=NUM_TOKENS + 1,
                                       probabilistic=True,
                                       attn_layers=Decoder(dim=dim, depth=depth, heads=heads,
                                                           attn_dim_head=dim // heads, **options))
    return ContinuousAutoregressiveWrapper(net)


def spec(wrapper):
    from fastardiff.exporter.foreign import ForeignModel

    return ForeignModel(model=wrapper, image_size=IMAGE_SIZE, patch=PATCH, start_tokens=class_start_tokens(),
                        class_names=DIGITS)


def digits():
    """The worked example's factory (`--model fastardiff.recipes.xtransformers_mnist:digits`): 4 layers, width 64."""
    return spec(build())


def digits_small():
    """A quick shape for tests: 2 layers, width 32, rotary positions, RMSNorm and a GLU feed-forward."""
    return spec(build(dim=32, depth=2, heads=4, rotary_pos_emb=True, use_rmsnorm=True, ff_glu=True))


def sequences(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, 1 + N, D]: each digit's start token, then its patch tokens."""
    from .data import image_tokens

    tokens = image_tokens(images, PATCH)
    return torch.cat([class_start_tokens()[labels].unsqueeze(1), tokens], 1)


def train(wrapper, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0, progress: bool = True):
    """Train `wrapper` with its own loss (the library's Gaussian NLL) on the training digits; returns the last loss."""
    from tqdm import tqdm

    from .data import BatchSampler, load_digit_split

    torch.manual_seed(seed)
    split = load_digit_split()
    data = sequences(split.train_images, split.train_labels)
    sampler = BatchSampler(len(data), batch, seed)
    opt = torch.optim.AdamW(wrapper.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    wrapper.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="train x-transformers", unit="step", disable=not progress, leave=False)
    for _ in bar:
        loss = wrapper(data[sampler.next()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapper.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    wrapper.eval()
    return float(loss.detach())


def save_state_dict(module, path: Path) -> Path:
    """torch.save of the state dict (tensors only), written atomically."""
    from .checkpoint import atomic_torch_save

    atomic_torch_save(module.state_dict(), Path(path))
    return Path(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="state dict to write (.pt)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="the 2-layer test shape (digits_small)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = (digits_small() if args.small else digits()).model
    start = time.perf_counter()
    loss = train(model, args.steps, args.batch, args.lr, args.seed)
    save_state_dict(model, args.out)
    log.info("trained %d steps in %.0f s (last loss %.3f); wrote %s", args.steps, time.perf_counter() - start, loss,
             args.out)


if __name__ == "__main__":
    main()
