"""The TP=1 shape of each Megatron logical tensor of a model, from its ModelConfig alone.

A property of Megatron-Core's modules (like the TP placement in ``megatron_layout``), not of
a family: the runtime checks every slice it loads against it, before any rank computes.
"""
from __future__ import annotations

from typing import Callable

from ..errors import MissingTensors
from ..families.schema import ModelConfig

Shape = Callable[[ModelConfig, int], tuple[int, ...]]


def _qkv(c: ModelConfig) -> int:
    return (c.num_heads + 2 * c.num_kv_heads) * c.head_dim


def _fc1(c: ModelConfig) -> int:
    return (2 if c.gated else 1) * c.ffn_hidden_size


# name suffix -> shape; first match wins
SHAPES: tuple[tuple[str, Shape], ...] = (
    ("embedding.word_embeddings.weight", lambda c, v: (v, c.hidden_size)),
    ("embedding.position_embeddings.weight", lambda c, v: (c.max_position_embeddings, c.hidden_size)),
    ("output_layer.weight", lambda c, v: (v, c.hidden_size)),
    ("q_layernorm.weight", lambda c, v: (c.head_dim,)),
    ("k_layernorm.weight", lambda c, v: (c.head_dim,)),
    ("layer_norm_weight", lambda c, v: (c.hidden_size,)),
    ("layer_norm_bias", lambda c, v: (c.hidden_size,)),
    ("layernorm.weight", lambda c, v: (c.hidden_size,)),
    ("layernorm.bias", lambda c, v: (c.hidden_size,)),
    ("linear_qkv.weight", lambda c, v: (_qkv(c), c.hidden_size)),
    ("linear_qkv.bias", lambda c, v: (_qkv(c),)),
    ("linear_proj.weight", lambda c, v: (c.hidden_size, c.num_heads * c.head_dim)),
    ("linear_proj.bias", lambda c, v: (c.hidden_size,)),
    ("linear_fc1.weight", lambda c, v: (_fc1(c), c.hidden_size)),
    ("linear_fc1.bias", lambda c, v: (_fc1(c),)),
    ("linear_fc2.weight", lambda c, v: (c.hidden_size, c.ffn_hidden_size)),
    ("linear_fc2.bias", lambda c, v: (c.hidden_size,)),
)


def logical_shape(name: str, cfg: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    """The TP=1 shape of a Megatron logical tensor of this model."""
    for suffix, shape in SHAPES:
        if name.endswith(suffix):
            return shape(cfg, padded_vocab)
    raise MissingTensors("no shape is known for this Megatron tensor", tensor=name,
                         fix="this module is not supported")
