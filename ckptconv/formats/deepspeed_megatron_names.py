"""Megatron-DeepSpeed (pre-Core Megatron) names and args -> Megatron-Core logical names and args.

Pure tables and functions (no I/O). The fork's tensor-parallel layouts are Megatron-Core's:
`query_key_value` rows are grouped per query group `[q heads of g, k_g, v_g]` (per head
`[q, k, v]` without GQA, checkpoint_version >= 2), `dense_h_to_4h` with SwiGLU holds
`[gate_r; up_r]` on TP rank r, `dense`/`dense_4h_to_h` are row-parallel, embeddings and the LM
head vocab-parallel. So a rename is all it takes to reach Megatron-Core's logical tensors.
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from ..errors import UnsupportedFamily

# local name inside one transformer layer -> Megatron-Core (TE key space) local name
LAYER_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",
    "self_attention.query_key_value.bias": "self_attention.linear_qkv.bias",
    "self_attention.dense.weight": "self_attention.linear_proj.weight",
    "self_attention.dense.bias": "self_attention.linear_proj.bias",
    "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "post_attention_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
    "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight",
    "mlp.dense_h_to_4h.bias": "mlp.linear_fc1.bias",
    "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight",
    "mlp.dense_4h_to_h.bias": "mlp.linear_fc2.bias",
}
EMBEDDING = {"word_embeddings.weight": "embedding.word_embeddings.weight"}
FINAL_NORM = {"weight": "decoder.final_layernorm.weight", "bias": "decoder.final_layernorm.bias"}
LM_HEAD = {"lm_head.weight": "output_layer.weight"}
NOT_SUPPORTED = {
    "position_embeddings.weight": "learned absolute position embeddings (GPT-2 / OPT style)",
    "word_embeddings.norm.weight": "an embedding LayerNorm (BLOOM style)",
    "word_embeddings.norm.bias": "an embedding LayerNorm (BLOOM style)",
}
# GPTModel (no pipeline): language_model.{embedding,encoder|transformer,output_layer}...
_FLAT_LAYER = re.compile(r"^(?:module\.)?language_model\.(?:encoder|transformer)\.layers\.(\d+)\.(.+)$")
_FLAT_NORM = re.compile(r"^(?:module\.)?language_model\.(?:encoder|transformer)\.final_(?:layer)?norm\.(weight|bias)$")
_FLAT_OTHER = re.compile(r"^(?:module\.)?language_model\.(embedding|output_layer)\.(.+)$")
TIED_HEAD_COPY = re.compile(r"^(?:module\.)?word_embeddings(?:_for_head)?\.weight$")


def unsupported(local: str, tensor: str) -> UnsupportedFamily:
    why = NOT_SUPPORTED.get(local, "a module no family table covers")
    return UnsupportedFamily(f"Megatron-DeepSpeed tensor is {why}", tensor=tensor,
                             fix="only Llama-style models (RMSNorm, SwiGLU, RoPE, no learned positions) convert")


def layer_name(layer: int, local: str, tensor: str) -> str:
    if local not in LAYER_NAMES:
        raise unsupported(local, tensor)
    return f"decoder.layers.{layer}.{LAYER_NAMES[local]}"


def flat_core_name(name: str) -> str | None:
    """GPTModel state-dict name -> Megatron-Core logical name; None for the last stage's copy of a
    tied embedding (word_embeddings_for_head), which carries no information."""
    if TIED_HEAD_COPY.match(name):
        return None
    m = _FLAT_LAYER.match(name)
    if m:
        return layer_name(int(m.group(1)), m.group(2), name)
    m = _FLAT_NORM.match(name)
    if m:
        return FINAL_NORM[m.group(1)]
    m = _FLAT_OTHER.match(name)
    if m:
        table = EMBEDDING if m.group(1) == "embedding" else {"weight": "output_layer.weight"}
        if m.group(2) in table:
            return table[m.group(2)]
        raise unsupported(m.group(2), name)
    raise unsupported(name, name)


def classify_layer(keys: list[str]) -> str:
    """What a pipeline layer file holds: embedding | layer | final_norm | lm_head | unknown."""
    ks = set(keys)
    if "word_embeddings.weight" in ks:
        return "embedding"
    if any(k.startswith(("self_attention.", "attention.")) for k in ks):
        return "layer"
    if "lm_head.weight" in ks:
        return "lm_head"
    if ks and ks <= {"weight", "bias"}:
        return "final_norm"
    return "unknown"


def core_args(args: Any) -> argparse.Namespace:
    """The fork's args (argparse.Namespace) with the Megatron-Core names config_from_args reads."""
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items()})
    heads = int(args.num_attention_heads)
    kv = int(getattr(args, "num_key_value_heads", None) or heads)
    ns.group_query_attention, ns.num_query_groups = kv != heads, kv
    norm = str(getattr(args, "normalization", "layernorm")).lower()
    ns.normalization = "RMSNorm" if norm == "rmsnorm" else "LayerNorm"
    ns.norm_epsilon = float(getattr(args, "layernorm_epsilon", getattr(args, "norm_epsilon", 1e-5)))
    ns.rotary_base = float(getattr(args, "rope_theta", None) or getattr(args, "rotary_base", None) or 10000)
    ns.add_bias_linear = bool(getattr(args, "add_bias_linear", True))
    ns.add_qkv_bias = ns.add_bias_linear
    ns.swiglu = bool(getattr(args, "swiglu", False))
    ns.use_rope_scaling = False
    ns.vocab_size = getattr(args, "vocab_size", None)
    # the fork's own encodings of "dense decoder": validate_args sets encoder_num_layers = num_layers,
    # and --num-experts is a list per layer group whose default [1] means no MoE (Core: None)
    if getattr(args, "encoder_num_layers", None) == getattr(args, "num_layers", None):
        ns.encoder_num_layers = None
    experts = getattr(args, "num_experts", None)
    if isinstance(experts, (list, tuple)) and experts and all(e == 1 for e in experts):
        ns.num_experts = None
    ns.position_embedding_type = _FORK_POSITIONS.get(_enum_value(getattr(args, "position_embedding_type", None)),
                                                     "rope" if getattr(args, "position_embedding_type", None) is None
                                                     else "unknown")
    return ns


# megatron.model.enums.PositionEmbeddingType of the fork: rotary = 1, absolute = 2, alibi = 3
_FORK_POSITIONS = {1: "rope", 2: "learned_absolute", 3: "alibi", "rotary": "rope", "absolute": "learned_absolute",
                   "alibi": "alibi", "rope": "rope"}


def _enum_value(v: Any) -> Any:
    """The value of an enum member as the safe unpickler leaves it (a Placeholder holding the
    constructor argument), or a plain value."""
    args = getattr(v, "args", None)
    if isinstance(args, tuple) and len(args) == 1:
        return args[0]
    return getattr(v, "value", v)


def check_rotary(args: Any) -> None:
    """Deriving a Llama-style config from args is only right for rotary models."""
    if not getattr(args, "use_rotary_position_embeddings", False) or getattr(args, "add_position_embedding", False):
        raise UnsupportedFamily("the checkpoint's args say the model does not use rotary position embeddings "
                                "(GPT-2 / BLOOM style)", fix="only Llama-style models convert; pass --hf-config if "
                                "the args are wrong")


def flatten(d: dict, prefix: str = ""):
    """Megatron-LM saves nested dicts (language_model -> encoder -> ...); DeepSpeed flat names."""
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from flatten(v, name)
        else:
            yield name, v
