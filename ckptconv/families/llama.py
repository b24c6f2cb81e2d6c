"""Llama 1/2/3 (and the base every Llama-like family extends)."""
from __future__ import annotations

from ..errors import UnsupportedFamily
from .schema import Family, ModelConfig, Rule

L = "model.layers.{i}."
M = "decoder.layers.{i}."

GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)

LAYER_RULES = (
    Rule(M + "self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",)),
    Rule(M + "self_attention.linear_qkv.weight",
         (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"), "qkv"),
    Rule(M + "self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",)),
    Rule(M + "mlp.linear_fc1.layer_norm_weight", (L + "post_attention_layernorm.weight",)),
    Rule(M + "mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), "gate_up"),
    Rule(M + "mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",)),
)

QKV_BIAS_RULES = (
    Rule(M + "self_attention.linear_qkv.bias",
         (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
         "qkv", when="qkv_bias"),
)


def rope_parameters(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = None if rope_type in (None, "default") else {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling


def _require(hf: dict, family: str, flag: str, unsupported: str) -> None:
    if hf.get(flag):
        raise UnsupportedFamily(f"{family} with {flag}=true ({unsupported}) has no Megatron-Core "
                                f"equivalent in the supported layouts", path="config.json",
                                fix=f"convert a model with {flag}=false")


def llama_config(hf: dict, family: str = "llama", qkv_bias: bool = False) -> ModelConfig:
    _require(hf, family, "attention_bias", "bias on q/k/v and o")
    _require(hf, family, "mlp_bias", "bias on the MLP")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedFamily(f"hidden_act={act!r} is not SwiGLU", path="config.json",
                                fix="only silu-gated MLPs are supported")
    heads = int(hf["num_attention_heads"])
    theta, scaling = rope_parameters(hf)
    return ModelConfig(
        family=family,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        vocab_size=int(hf["vocab_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_scaling=scaling,
        hf_config=dict(hf),
    )


def hf_config_for(cfg: ModelConfig, architecture: str, model_type: str, **extra) -> dict:
    """A fresh HF config dict for ``cfg`` (used when the checkpoint carries none)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    return {
        "architectures": [architecture], "model_type": model_type,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, **extra,
    }


LLAMA = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    global_rules=GLOBAL_RULES,
    layer_rules=LAYER_RULES,
    from_hf_config=llama_config,
    to_hf_config=lambda c: hf_config_for(c, "LlamaForCausalLM", "llama",
                                         attention_bias=False, mlp_bias=False),
)
