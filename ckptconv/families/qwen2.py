"""Qwen2: the Llama tables plus q/k/v biases (no o_proj bias)."""
from __future__ import annotations

from .llama import LLAMA, QKV_BIAS_RULES, hf_config_for, llama_config

QWEN2 = LLAMA.extend(
    "qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    extra_layer_rules=QKV_BIAS_RULES,
    from_hf_config=lambda hf: llama_config({**hf, "attention_bias": False}, family="qwen2", qkv_bias=True),
    to_hf_config=lambda c: hf_config_for(c, "Qwen2ForCausalLM", "qwen2", use_sliding_window=False),
)
