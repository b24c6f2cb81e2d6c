"""Qwen3: the Llama tables plus per-head q/k RMSNorm (``qk_layernorm``), explicit head_dim,
no qkv bias; Qwen2's per-layer window rule."""
from __future__ import annotations

from .llama import LLAMA, M, L
from .schema import Rule

QK_NORM_RULES = (
    Rule(M + "self_attention.q_layernorm.weight", (L + "self_attn.q_norm.weight",), when="qk_norm"),
    Rule(M + "self_attention.k_layernorm.weight", (L + "self_attn.k_norm.weight",), when="qk_norm"),
)

QWEN3 = LLAMA.extend(
    "qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_types=("qwen3",),
    extra_layer_rules=QK_NORM_RULES,
    features={"qk_norm": True},
    windows="layer_types",
)
