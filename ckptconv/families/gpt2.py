"""GPT-2 / classic Megatron GPT: LayerNorm with bias, learned absolute positions, tanh-GeLU
MLP without gating, a bias on every linear, tied embeddings. HF's Conv1D weights are stored
[in, out] (transposed); ``c_attn`` is [Q; K; V] and is grouped per head for linear_qkv."""
from __future__ import annotations

from .llama import LLAMA, M
from .schema import Rule

H = "transformer.h.{i}."

GPT2_GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
    Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
    Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
    Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)
GPT2_LAYER_RULES = (
    Rule(M + "self_attention.linear_qkv.layer_norm_weight", (H + "ln_1.weight",)),
    Rule(M + "self_attention.linear_qkv.layer_norm_bias", (H + "ln_1.bias",)),
    Rule(M + "self_attention.linear_qkv.weight", (H + "attn.c_attn.weight",), "qkv_fused_t"),
    Rule(M + "self_attention.linear_qkv.bias", (H + "attn.c_attn.bias",), "qkv_fused"),
    Rule(M + "self_attention.linear_proj.weight", (H + "attn.c_proj.weight",), "transpose"),
    Rule(M + "self_attention.linear_proj.bias", (H + "attn.c_proj.bias",)),
    Rule(M + "mlp.linear_fc1.layer_norm_weight", (H + "ln_2.weight",)),
    Rule(M + "mlp.linear_fc1.layer_norm_bias", (H + "ln_2.bias",)),
    Rule(M + "mlp.linear_fc1.weight", (H + "mlp.c_fc.weight",), "transpose"),
    Rule(M + "mlp.linear_fc1.bias", (H + "mlp.c_fc.bias",)),
    Rule(M + "mlp.linear_fc2.weight", (H + "mlp.c_proj.weight",), "transpose"),
    Rule(M + "mlp.linear_fc2.bias", (H + "mlp.c_proj.bias",)),
)

GPT2 = LLAMA.extend(
    "gpt2",
    hf_architectures=("GPT2LMHeadModel",),
    hf_model_types=("gpt2",),
    global_rules=GPT2_GLOBAL_RULES,
    layer_rules=GPT2_LAYER_RULES,
    features={"norm": "layernorm", "activation": "gelu_tanh", "gated": False, "linear_bias": True,
              "qkv_bias": True, "position": "learned_absolute"},
    hf_keys={"num_layers": "n_layer", "hidden_size": "n_embd", "num_heads": "n_head", "ffn_hidden_size": "n_inner",
             "norm_eps": "layer_norm_epsilon", "max_position_embeddings": "n_positions",
             "num_kv_heads": None, "head_dim": None},
    hf_defaults={"ffn_hidden_size": lambda v: 4 * v["hidden_size"], "tie_embeddings": True, "norm_eps": 1e-5,
                 "max_position_embeddings": 1024},
    hf_required={"attention_bias": None, "mlp_bias": None, "hidden_act": None,
                 "activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True, None),
                 "scale_attn_by_inverse_layer_idx": (False, None), "add_cross_attention": (False, None)},
    ignore_hf=(r"\.attn\.(masked_)?bias$",),
)
