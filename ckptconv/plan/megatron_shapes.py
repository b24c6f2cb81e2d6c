"""The TP=1 shape of each Megatron logical tensor of a model, from its ModelConfig alone.

A property of Megatron-Core's modules (like the TP placement in ``megatron_layout``), not of
a family: the runtime checks every slice it loads against it, before any rank computes.
"""
from __future__ import annotations

import re
from typing import Callable

from ..errors import MissingTensors
from ..families.schema import ModelConfig

Shape = Callable[[ModelConfig, int], tuple[int, ...]]


def _qkv(c: ModelConfig) -> int:
    return (c.num_heads + 2 * c.num_kv_heads) * c.head_dim


def _fc1(c: ModelConfig) -> int:
    return (2 if c.gated else 1) * c.ffn_hidden_size


def _expert_fc1(c: ModelConfig) -> int:
    return (2 if c.gated else 1) * c.moe_ffn_hidden_size


def _shared_fc1(c: ModelConfig) -> int:
    return (2 if c.gated else 1) * c.shared_expert_size


# name suffix (a regular expression matched at the end of the name) -> shape; first match wins
SHAPES: tuple[tuple[str, Shape], ...] = (
    # Mixture of Experts (an expert name carries its global index; shared experts are TP-split like the MLP)
    (r"mlp\.router\.weight", lambda c, v: (c.num_experts, c.hidden_size)),
    (r"local_experts\.\d+\.linear_fc1\.weight", lambda c, v: (_expert_fc1(c), c.hidden_size)),
    (r"local_experts\.\d+\.linear_fc2\.weight", lambda c, v: (c.hidden_size, c.moe_ffn_hidden_size)),
    (r"shared_experts\.linear_fc1\.weight", lambda c, v: (_shared_fc1(c), c.hidden_size)),
    (r"shared_experts\.linear_fc2\.weight", lambda c, v: (c.hidden_size, c.shared_expert_size)),
    (r"shared_experts\.gate_weight", lambda c, v: (1, c.hidden_size)),
    (r"embedding\.word_embeddings\.weight", lambda c, v: (v, c.hidden_size)),
    (r"embedding\.position_embeddings\.weight", lambda c, v: (c.max_position_embeddings, c.hidden_size)),
    (r"output_layer\.weight", lambda c, v: (v, c.hidden_size)),
    (r"q_layernorm\.weight", lambda c, v: (c.head_dim,)),
    (r"k_layernorm\.weight", lambda c, v: (c.head_dim,)),
    (r"layer_norm_weight", lambda c, v: (c.hidden_size,)),
    (r"layer_norm_bias", lambda c, v: (c.hidden_size,)),
    (r"layernorm\.weight", lambda c, v: (c.hidden_size,)),
    (r"layernorm\.bias", lambda c, v: (c.hidden_size,)),
    (r"linear_qkv\.weight", lambda c, v: (_qkv(c), c.hidden_size)),
    (r"linear_qkv\.bias", lambda c, v: (_qkv(c),)),
    (r"linear_proj\.weight", lambda c, v: (c.hidden_size, c.num_heads * c.head_dim)),
    (r"linear_proj\.bias", lambda c, v: (c.hidden_size,)),
    (r"linear_fc1\.weight", lambda c, v: (_fc1(c), c.hidden_size)),
    (r"linear_fc1\.bias", lambda c, v: (_fc1(c),)),
    (r"linear_fc2\.weight", lambda c, v: (c.hidden_size, c.ffn_hidden_size)),
    (r"linear_fc2\.bias", lambda c, v: (c.hidden_size,)),
)

_SHAPE_RES = tuple((re.compile(pattern + "$"), shape) for pattern, shape in SHAPES)


def logical_shape(name: str, cfg: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    """The TP=1 shape of a Megatron logical tensor of this model."""
    for suffix, shape in _SHAPE_RES:
        if suffix.search(name):
            return shape(cfg, padded_vocab)
    raise MissingTensors("no shape is known for this Megatron tensor", tensor=name,
                         fix="this module is not supported")
