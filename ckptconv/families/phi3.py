"""Phi-3: fused ``qkv_proj`` ([Q; K; V], split then grouped) and ``gate_up_proj`` ([gate; up]
is Megatron's TP=1 fc1 as is); partial rotary (``partial_rotary_factor`` <-> rotary_percent);
``sliding_window`` on every layer."""
from __future__ import annotations

from .llama import LLAMA, M, L
from .schema import FREE, Rule

PHI3_LAYER_RULES = (
    Rule(M + "self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",)),
    Rule(M + "self_attention.linear_qkv.weight", (L + "self_attn.qkv_proj.weight",), "qkv_fused"),
    Rule(M + "self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",)),
    Rule(M + "mlp.linear_fc1.layer_norm_weight", (L + "post_attention_layernorm.weight",)),
    Rule(M + "mlp.linear_fc1.weight", (L + "mlp.gate_up_proj.weight",)),
    Rule(M + "mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",)),
)

PHI3 = LLAMA.extend(
    "phi3",
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_types=("phi3",),
    layer_rules=PHI3_LAYER_RULES,
    features={"rotary_percent": FREE},
    hf_keys={"rotary_percent": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor")},
    windows="all",
)
