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
# TEGroupedMLP stores expert j as `mlp.experts.linear_fc1.weight{j}`; SequentialMLP (canonical) as
# `mlp.experts.local_experts.{j}.linear_fc1.weight`. Legacy GroupedMLP packs them (`weight1`/`weight2`).
_GROUPED = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")
_SEQUENTIAL = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")
_LEGACY_GROUPED = re.compile(r"^decoder\.layers\.\d+\.mlp\.experts\.weight[12]$")

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
    """Any key space -> TE names, experts in the SequentialMLP form."""
    m = _GROUPED.match(name)
    if m:
        return f"{m.group(1)}local_experts.{m.group(4)}.{m.group(2)}.{m.group(3)}"
    return _rename(name, LOCAL_TO_TE)


def to_impl(name: str, impl: str, *, moe_layer: bool = False, grouped_gemm: bool = False) -> str:
    """TE names -> the key space of ``impl``. In an MoE layer the pre-MLP norm is its own module
    (`pre_mlp_layernorm`) in both specs; ``grouped_gemm`` names experts the TEGroupedMLP way."""
    if moe_layer and name.endswith(".mlp.linear_fc1.layer_norm_weight"):
        return name[: -len("mlp.linear_fc1.layer_norm_weight")] + "pre_mlp_layernorm.weight"
    m = _SEQUENTIAL.match(name) if grouped_gemm else None
    if m:
        return f"{m.group(1)}{m.group(3)}.{m.group(4)}{m.group(2)}"
    return _rename(name, TE_TO_LOCAL) if impl == "local" else name


def expert_form(name: str) -> str | None:
    """How a stored name lays out experts: "sequential", "grouped", "legacy_grouped", or None."""
    if _SEQUENTIAL.match(name):
        return "sequential"
    if _GROUPED.match(name):
        return "grouped"
    if _LEGACY_GROUPED.match(name):
        return "legacy_grouped"
    return None


def is_extra_state(name: str) -> bool:
    return name.endswith("._extra_state")


def extra_state_keys(local_names: list[str], impl: str, has_output_layer: bool) -> list[str]:
    """The `_extra_state` keys a Megatron module tree with these parameters has (strict loading
    needs them): one per linear module of each layer (`linear_qkv`, `linear_proj`, the MLP's,
    each expert's and the shared experts' `linear_fc1`/`linear_fc2`; TE adds `core_attention`),
    and one for the output layer, which exists on the last stage even when its weight is tied to
    the embedding."""
    keys: dict[str, None] = {}
    for n in local_names:
        m = _LAYER.match(n)
        if not m:
            continue
        module = m.group(2).rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1].startswith("linear_"):
            if impl == "transformer_engine" and module == "self_attention.linear_qkv":
                keys[f"{m.group(1)}self_attention.core_attention._extra_state"] = None
            keys[f"{m.group(1)}{module}._extra_state"] = None
    if has_output_layer:
        keys["output_layer._extra_state"] = None
    return list(keys)
