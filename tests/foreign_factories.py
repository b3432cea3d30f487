"""Factories of foreign models for tests/test_foreign*.py, imported by module path as a user's code would be
(`--model foreign_factories:<name>`): tiny x-transformers models, one per library option under test."""
from __future__ import annotations

import torch

from fastardiff.recipes import xtransformers_mnist as xt


def _spec(**options):
    torch.manual_seed(0)
    return xt.spec(xt.build(dim=32, depth=2, heads=4, **options))


def absolute_layernorm():
    return _spec()


def rotary_rmsnorm_glu():
    return _spec(rotary_pos_emb=True, use_rmsnorm=True, ff_glu=True)


def grouped_query():
    return _spec(attn_kv_heads=2, rotary_pos_emb=True)


def qk_norm():                      # an option the adapter refuses
    return _spec(attn_qk_norm=True)


def bidirectional():                # an Encoder (MAR-style): refused
    from x_transformers import ContinuousTransformerWrapper, Encoder

    torch.manual_seed(0)
    net = ContinuousTransformerWrapper(dim_in=16, dim_out=16, max_seq_len=65, probabilistic=True,
                                       attn_layers=Encoder(dim=32, depth=2, heads=4))
    return xt.spec(net)


def point_estimate():               # probabilistic=False: no per-token distribution
    from x_transformers import ContinuousTransformerWrapper, Decoder

    torch.manual_seed(0)
    net = ContinuousTransformerWrapper(dim_in=16, dim_out=16, max_seq_len=65,
                                       attn_layers=Decoder(dim=32, depth=2, heads=4))
    return xt.spec(net)


def not_a_spec():
    return torch.nn.Linear(2, 2)


def llama_without_head():           # a Hugging Face backbone with no per-token head: refused
    from fastardiff.recipes import hf_llama_mnist

    spec = hf_llama_mnist.digits()
    spec.head = None
    return spec
