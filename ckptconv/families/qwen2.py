"""Qwen2: the Llama tables plus q/k/v biases (no o_proj bias); per-layer window rule."""
from __future__ import annotations

from .llama import LLAMA, QKV_BIAS_RULES

QWEN2 = LLAMA.extend(
    "qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    extra_layer_rules=QKV_BIAS_RULES,
    features={"qkv_bias": True},
    hf_required={"attention_bias": None, "mlp_bias": None},
    windows="layer_types",
)
