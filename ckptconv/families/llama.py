"""Llama 1/2/3 (and the base every other family extends)."""
from __future__ import annotations

from dataclasses import MISSING, fields

from .hf_config import rope_parameters  # noqa: F401  (re-exported: the rope reader lives there)
from .schema import FEATURES, Family, ModelConfig, Rule

L = "model.layers.{i}."
M = "decoder.layers.{i}."

GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)

ATTENTION_RULES = (
    Rule(M + "self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",)),
    Rule(M + "self_attention.linear_qkv.weight",
         (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"), "qkv"),
    Rule(M + "self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",)),
)
MLP_RULES = (
    Rule(M + "mlp.linear_fc1.layer_norm_weight", (L + "post_attention_layernorm.weight",)),
    Rule(M + "mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), "gate_up"),
    Rule(M + "mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",)),
)
LAYER_RULES = ATTENTION_RULES + MLP_RULES

QKV_BIAS_RULES = (
    Rule(M + "self_attention.linear_qkv.bias",
         (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
         "qkv", when="qkv_bias"),
)

# Llama fixes every architecture feature at ModelConfig's defaults (no qkv bias).
_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}
LLAMA_FEATURES = {name: _DEFAULTS.get(name, False) for name in FEATURES}

HF_KEYS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings", "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
}
HF_DEFAULTS = {
    "num_kv_heads": lambda v: v["num_heads"], "head_dim": lambda v: v["hidden_size"] // v["num_heads"],
    "tie_embeddings": False, "norm_eps": 1e-6, "max_position_embeddings": 4096,
}
HF_REQUIRED = {"attention_bias": (False, None), "mlp_bias": (False, None), "hidden_act": ("silu", "swish", None)}

LLAMA = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    global_rules=GLOBAL_RULES,
    layer_rules=LAYER_RULES,
    features=LLAMA_FEATURES,
    hf_keys=HF_KEYS,
    hf_defaults=HF_DEFAULTS,
    hf_required=HF_REQUIRED,
    windows="none",
    ignore_hf=(r"rotary_emb\.inv_freq$",),
)
