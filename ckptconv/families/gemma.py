"""Gemma 2 and Gemma 3 (text): RMSNorm computing x_hat * (1 + w) (Megatron's zero-centred gamma
stores the same w), four norms per layer (the post-attention and post-feedforward ones named
as Megatron-Bridge names them), embeddings scaled by sqrt(hidden), GeGLU (tanh), tied,
``query_pre_attn_scalar``, alternating sliding windows; Gemma 2 soft-caps attention scores and
logits, Gemma 3 adds q/k norms and a second RoPE base for its sliding layers."""
from __future__ import annotations

from .llama import ATTENTION_RULES, LLAMA, L, M, MLP_RULES
from .qwen3 import QK_NORM_RULES
from .schema import FREE, Rule

SANDWICH_RULES = (
    Rule(M + "self_attention.linear_proj.post_layernorm.weight", (L + "post_attention_layernorm.weight",)),
    Rule(M + "mlp.linear_fc1.layer_norm_weight", (L + "pre_feedforward_layernorm.weight",)),
    Rule(M + "mlp.linear_fc2.post_layernorm.weight", (L + "post_feedforward_layernorm.weight",)),
)
GEMMA2_LAYER_RULES = ATTENTION_RULES + SANDWICH_RULES + tuple(r for r in MLP_RULES if "layer_norm" not in r.megatron)

GEMMA2 = LLAMA.extend(
    "gemma2",
    hf_architectures=("Gemma2ForCausalLM",),
    hf_model_types=("gemma2",),
    layer_rules=GEMMA2_LAYER_RULES,
    features={"norm_offset": 1.0, "activation": "gelu_tanh", "sandwich_norm": True, "embedding_scale": True,
              "attn_softcap": FREE, "final_softcap": FREE, "query_pre_attn_scalar": FREE},
    hf_keys={"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
             "query_pre_attn_scalar": "query_pre_attn_scalar"},
    hf_defaults={"tie_embeddings": True},
    hf_required={"hidden_act": None, "hidden_activation": ("gelu_pytorch_tanh", "gelu_tanh"),
                 "use_bidirectional_attention": (False, None)},
    windows="layer_types",
)

GEMMA3 = GEMMA2.extend(
    "gemma3",
    hf_architectures=("Gemma3ForCausalLM",),
    hf_model_types=("gemma3_text",),
    extra_layer_rules=QK_NORM_RULES,
    features={"qk_norm": True, "rope_local_theta": FREE},
    hf_keys={"rope_theta": "rope_parameters.full_attention.rope_theta",
             "rope_local_theta": "rope_parameters.sliding_attention.rope_theta"},
    hf_required={"rope_parameters.full_attention.rope_type": ("default",),
                 "rope_parameters.sliding_attention.rope_type": ("default",)},
)
