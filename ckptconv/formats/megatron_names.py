"""Megatron-Core key spaces: Transformer Engine names (canonical) vs the local spec.

The logical catalog always uses the TE names (as Megatron's distributed checkpoint does);
per-rank `torch` checkpoints of the local spec store the norms under their own names.
"""
from __future__ import annotations

import re

IMPLS = ("transformer_engine", "local")

# local-spec suffix -> Transformer Engine suffix (within one decoder layer)
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
TE_TO_LOCAL = {v: k for k, v in LOCAL_TO_TE.items()}
_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.*)$")

# Modules whose state_dict carries an `_extra_state` entry (None when saved by the local spec).
EXTRA_STATE_MODULES = {
    "local": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"),
    "transformer_engine": ("self_attention.linear_qkv", "self_attention.core_attention",
                           "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"),
}


def _rename(name: str, table: dict[str, str]) -> str:
    m = _LAYER.match(name)
    if m and m.group(2) in table:
        return m.group(1) + table[m.group(2)]
    return name


def to_canonical(name: str) -> str:
    """Any key space -> TE names."""
    return _rename(name, LOCAL_TO_TE)


def to_impl(name: str, impl: str) -> str:
    """TE names -> the key space of ``impl``."""
    return _rename(name, TE_TO_LOCAL) if impl == "local" else name


def is_extra_state(name: str) -> bool:
    return name.endswith("._extra_state")


def extra_state_keys(local_names: list[str], impl: str, has_output_layer: bool) -> list[str]:
    """The `_extra_state` keys a Megatron module tree with these parameters has (strict loading
    needs them): one per linear module of each layer, and one for the output layer, which
    exists on the last stage even when its weight is tied to the embedding."""
    keys: list[str] = []
    layers = sorted({m.group(1) for n in local_names if (m := _LAYER.match(n))},
                    key=lambda p: int(p.split(".")[2]))
    for prefix in layers:
        keys += [f"{prefix}{mod}._extra_state" for mod in EXTRA_STATE_MODULES[impl]]
    if has_output_layer:
        keys.append("output_layer._extra_state")
    return keys
