"""ModelConfig <-> Megatron-LM `args` (argparse.Namespace), the way Megatron-LM names them.

Both directions are driven by one table per direction over the architecture features of
``ModelConfig`` (see ``families.schema``); the family of a checkpoint without a carried HF
config is the first registered family whose fixed features equal the ones the args state.

The Namespace holds only plain values and torch dtypes, so Megatron's weights-only loaders
accept it and `--use-checkpoint-args` can rebuild the model from it.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch

from ..errors import UnsupportedFamily
from ..families import FAMILIES, family_for_hf
from ..families.hf_config import unmatched_features
from ..families.schema import ModelConfig
from ..plan.megatron_layout import MegatronLayout
from .megatron_args_fields import check_args_fields

NORMS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def window_args(windows: tuple) -> dict:
    """Megatron-Core's window_size (left, right) and window_attn_skip_freq for per-layer
    windows W (attend to delta < W, i.e. left = W - 1); an int skip frequency N when every
    N-th layer (1-based) is the full-attention one, else the per-layer list (1 = window)."""
    sizes = {w for w in windows if w}
    if not sizes:
        return {"window_size": None, "window_attn_skip_freq": None}
    if len(sizes) > 1:
        raise UnsupportedFamily(f"layers use different window sizes {sorted(sizes)}; Megatron-Core has one "
                                "window_size", path="config.json", fix="convert a model with one window size")
    flags = [1 if w else 0 for w in windows]
    skip = None
    if not all(flags):
        n = flags.index(0) + 1
        skip = n if flags == [int((i + 1) % n != 0) for i in range(len(flags))] else flags
    return {"window_size": (sizes.pop() - 1, 0), "window_attn_skip_freq": skip}


def windows_from_args(args: Any, layers: int) -> tuple:
    size = getattr(args, "window_size", None)
    if not size:
        return ()
    try:
        left, right = (int(x) for x in size)
    except (TypeError, ValueError):
        left, right = -1, -1
    if right != 0 or left < 0:
        raise UnsupportedFamily(f"args window_size={size!r} is not a causal sliding window (left, 0)",
                                fix="convert a model with a causal window, or pass --hf-config")
    skip = getattr(args, "window_attn_skip_freq", None)
    flags = ([1] * layers if skip is None else
             [int((i + 1) % int(skip) != 0) for i in range(layers)] if isinstance(skip, int) else list(skip))
    if len(flags) != layers:
        raise UnsupportedFamily(f"args window_attn_skip_freq has {len(flags)} entries for {layers} layers",
                                fix="the checkpoint's args are inconsistent; pass --hf-config")
    return tuple(left + 1 if f else None for f in flags)


# cfg -> args fields (besides the sizes and the layout)
TO_ARGS = {
    "normalization": lambda c: NORMS[c.norm],
    "apply_layernorm_1p": lambda c: c.norm_offset == 1.0,
    "layernorm_zero_centered_gamma": lambda c: c.norm_offset == 1.0,
    "swiglu": lambda c: c.gated and c.activation == "silu",
    "gated_linear_unit": lambda c: c.gated,
    "openai_gelu": lambda c: c.activation == "gelu_tanh",
    "add_bias_linear": lambda c: c.linear_bias,
    "add_qkv_bias": lambda c: c.qkv_bias,
    "position_embedding_type": lambda c: c.position,
    "use_rotary_position_embeddings": lambda c: c.position == "rope",
    "add_position_embedding": lambda c: c.position == "learned_absolute",
    "qk_layernorm": lambda c: c.qk_norm,
    "rotary_percent": lambda c: c.rotary_percent,
    "softmax_scale": lambda c: c.softmax_scale if c.query_pre_attn_scalar else None,
    # named as Megatron-Bridge's Gemma providers name them (Megatron-Core has no such fields)
    "query_pre_attn_scalar": lambda c: c.query_pre_attn_scalar,
    "attn_logit_softcapping": lambda c: c.attn_softcap,
    "final_logit_softcapping": lambda c: c.final_softcap,
    "rope_local_base_freq": lambda c: c.rope_local_theta,
    # what Megatron-Core 0.16.1 cannot express at all (see docs/families.md): recorded for users
    "ckptconv_sandwich_norms": lambda c: c.sandwich_norm,
    "ckptconv_embedding_scale": lambda c: c.embedding_scale,
    # Mixture of Experts (None / defaults for a dense model)
    "num_experts": lambda c: c.num_experts,
    "moe_router_topk": lambda c: c.moe_topk if c.num_experts else 2,
    "moe_ffn_hidden_size": lambda c: c.moe_ffn_hidden_size,
    "moe_router_pre_softmax": lambda c: bool(c.num_experts) and not c.moe_norm_topk,
    "moe_shared_expert_intermediate_size": lambda c: c.shared_expert_size if c.num_experts else None,
    "moe_shared_expert_gate": lambda c: bool(c.num_experts and c.shared_expert_size and c.shared_expert_gate),
    "moe_layer_freq": lambda c: moe_layer_freq(c),
}


def moe_layer_freq(cfg: ModelConfig):
    """Megatron-LM's moe_layer_freq: 1 when every layer is an MoE layer, else the per-layer pattern."""
    pattern = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    return 1 if all(pattern) or not cfg.num_experts else pattern


# MoE fields and the values they have in a dense model (Megatron-LM's defaults)
MOE_DENSE_DEFAULTS = {"moe_router_topk": 2, "moe_ffn_hidden_size": None, "moe_router_pre_softmax": False,
                      "moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False,
                      "moe_layer_freq": 1}


def check_moe_args(args: Any) -> None:
    """MoE fields are consistent: a number of experts, and no MoE setting in a dense model."""
    n = getattr(args, "num_experts", None)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise UnsupportedFamily(f"args num_experts={n!r} is not a positive number of experts",
                                fix="the checkpoint's args are inconsistent")
    if n is None:
        odd = {k: getattr(args, k) for k, v in MOE_DENSE_DEFAULTS.items() if getattr(args, k, v) != v}
        if odd:
            k = next(iter(odd))
            raise UnsupportedFamily(f"args {k}={odd[k]!r} is a Mixture-of-Experts setting, but num_experts is not set",
                                    fix="the checkpoint's args are inconsistent: set num_experts or drop the MoE fields")
    freq = getattr(args, "moe_layer_freq", 1)
    if n and not (isinstance(freq, int) and freq >= 1 or isinstance(freq, (list, tuple))
                  and all(v in (0, 1) for v in freq)):
        raise UnsupportedFamily(f"args moe_layer_freq={freq!r} is neither a layer frequency nor a 0/1 pattern",
                                fix="the checkpoint's args are inconsistent")


def moe_dense_layers(args: Any) -> tuple:
    """The dense layers of an MoE model from moe_layer_freq (int N: layer i is MoE when i % N == 0)."""
    if not getattr(args, "num_experts", None):
        return ()
    freq, layers = getattr(args, "moe_layer_freq", 1) or 1, int(args.num_layers)
    pattern = [int(i % int(freq) == 0) for i in range(layers)] if isinstance(freq, int) else list(freq)
    if len(pattern) != layers:
        raise UnsupportedFamily(f"moe_layer_freq has {len(pattern)} entries for {layers} layers",
                                fix="the checkpoint's args are inconsistent")
    return tuple(i for i, v in enumerate(pattern) if not v)

def _position(args: Any) -> str:
    """position_embedding_type; Megatron-DeepSpeed pickles an enum there, so its booleans decide."""
    value = getattr(args, "position_embedding_type", None)
    if isinstance(value, str):
        return value
    if getattr(args, "add_position_embedding", False) and not getattr(args, "use_rotary_position_embeddings", False):
        return "learned_absolute"
    return "rope"


# args -> cfg features (defaults: what older ckptconv and hand-built args assume)
FROM_ARGS = {
    "norm": lambda a: {v: k for k, v in NORMS.items()}[getattr(a, "normalization", None) or "RMSNorm"],
    "norm_offset": lambda a: 1.0 if getattr(a, "apply_layernorm_1p", False)
    or getattr(a, "layernorm_zero_centered_gamma", False) else 0.0,
    "gated": lambda a: bool(getattr(a, "swiglu", False) or getattr(a, "gated_linear_unit", False)),
    "activation": lambda a: "silu" if getattr(a, "swiglu", False) else
    "gelu_tanh" if getattr(a, "openai_gelu", False) else "gelu",
    "linear_bias": lambda a: bool(getattr(a, "add_bias_linear", False)),
    "qkv_bias": lambda a: bool(getattr(a, "add_qkv_bias", False) or getattr(a, "add_bias_linear", False)),
    "position": lambda a: _position(a),
    "qk_norm": lambda a: bool(getattr(a, "qk_layernorm", False)),
    "rotary_percent": lambda a: float(getattr(a, "rotary_percent", None) or 1.0),
    "query_pre_attn_scalar": lambda a: getattr(a, "query_pre_attn_scalar", None),
    "attn_softcap": lambda a: getattr(a, "attn_logit_softcapping", None),
    "final_softcap": lambda a: getattr(a, "final_logit_softcapping", None),
    "rope_local_theta": lambda a: getattr(a, "rope_local_base_freq", None),
    "sandwich_norm": lambda a: bool(getattr(a, "ckptconv_sandwich_norms", False)),
    "embedding_scale": lambda a: bool(getattr(a, "ckptconv_embedding_scale", False)),
    "num_experts": lambda a: int(a.num_experts) if getattr(a, "num_experts", None) else None,
    "moe_topk": lambda a: int(getattr(a, "moe_router_topk", 2) or 2) if getattr(a, "num_experts", None) else None,
    "moe_ffn_hidden_size": lambda a: (int(getattr(a, "moe_ffn_hidden_size", None) or a.ffn_hidden_size)
                                      if getattr(a, "num_experts", None) else None),
    "moe_norm_topk": lambda a: not getattr(a, "moe_router_pre_softmax", False),
    "shared_expert_size": lambda a: getattr(a, "moe_shared_expert_intermediate_size", None)
    if getattr(a, "num_experts", None) else None,
    "shared_expert_gate": lambda a: bool(getattr(a, "moe_shared_expert_gate", False)),
    "moe_dense_layers": moe_dense_layers,
}


def _rope_scaling_args(cfg: ModelConfig) -> dict:
    scaling = cfg.rope_scaling or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise UnsupportedFamily(f"rope scaling {scaling.get('rope_type')!r} has no Megatron-Core equivalent",
                                path="config.json", fix="only llama3-style rope scaling is supported")
    odd = {k: scaling[k] for k in LLAMA3_FIXED if scaling and k in scaling and float(scaling[k]) != LLAMA3_FIXED[k]}
    if odd:
        raise UnsupportedFamily(f"llama3 rope scaling with {odd}: Megatron-Core hard-codes {LLAMA3_FIXED}",
                                path="config.json", fix="only the Llama 3.x rope scaling constants are supported")
    return {"use_rope_scaling": bool(scaling), "rope_scaling_factor": float(scaling.get("factor", 8.0))}


def build_args(cfg: ModelConfig, layout: MegatronLayout, *, padded_vocab: int, divisible_by: int,
               dtype: torch.dtype, impl: str, iteration: int, grouped_gemm: bool = False) -> argparse.Namespace:
    gqa = cfg.num_kv_heads != cfg.num_heads
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, kv_channels=cfg.head_dim,
        group_query_attention=gqa, num_query_groups=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=min(cfg.max_position_embeddings, 4096),
        rotary_base=cfg.rope_theta, rotary_interleaved=False, **_rope_scaling_args(cfg),
        norm_epsilon=cfg.norm_eps, **{k: f(cfg) for k, f in TO_ARGS.items()}, **window_args(cfg.layer_windows),
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_per_virtual_pipeline_stage=(cfg.num_layers // (layout.pp * layout.vpp)) if layout.vpp else None,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        moe_grouped_gemm=grouped_gemm, moe_router_score_function="softmax", moe_token_dispatcher_type="allgather",
        moe_expert_capacity_factor=None,
        transformer_impl=impl, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tokenizer_type="HuggingFaceTokenizer", ckpt_format="torch", iteration=iteration,
        consumed_train_samples=0, consumed_valid_samples=0,
    )


def gated_mlp(args: Any) -> bool:
    """Is fc1 [gate; up] (TP rank r holds [gate_r; up_r])? SwiGLU, or any gated linear unit
    (Gemma's GeGLU: gated_linear_unit with openai_gelu); missing fields: gated, as before."""
    return bool(getattr(args, "swiglu", True) or getattr(args, "gated_linear_unit", False))


def layout_from_args(args: Any) -> MegatronLayout:
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    return MegatronLayout(
        tp=int(getattr(args, "tensor_model_parallel_size", 1) or 1),
        pp=int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
        num_layers=int(args.num_layers),
        vpp=int(vpp) if vpp and int(vpp) > 1 else None,
        first_stage_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
        last_stage_layers=getattr(args, "decoder_last_pipeline_num_layers", None),
        num_experts=int(args.num_experts) if getattr(args, "num_experts", None) else None,
        ep=int(getattr(args, "expert_model_parallel_size", 1) or 1),
        etp=int(getattr(args, "expert_tensor_parallel_size", 1) or 1),
    )


def config_from_args(args: Any, hf_config: dict | None = None, *, check_fields: bool = True) -> ModelConfig:
    """The model config of a Megatron checkpoint; an HF config (carried in the checkpoint or
    given with --hf-config) decides the family and restores the exact architecture. Args fields
    that change the function and are not mapped are refused (``megatron_args_fields``) unless
    ``check_fields`` is off (the args are carried verbatim, as by reshard)."""
    if check_fields:
        check_args_fields(args)
    if hf_config:
        return family_for_hf(hf_config).from_hf_config(hf_config)
    check_moe_args(args)
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    vocab = getattr(args, "vocab_size", None) or int(args.padded_vocab_size)
    scaling = None
    if getattr(args, "use_rope_scaling", False):
        scaling = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), **LLAMA3_FIXED}
    cfg = ModelConfig(
        family="?", num_layers=int(args.num_layers), hidden_size=int(args.hidden_size),
        ffn_hidden_size=int(args.ffn_hidden_size), num_heads=heads, num_kv_heads=groups,
        head_dim=int(getattr(args, "kv_channels", None) or int(args.hidden_size) // heads),
        vocab_size=int(vocab), tie_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        norm_eps=float(getattr(args, "layernorm_epsilon", None) or getattr(args, "norm_epsilon", 1e-5)),
        rope_theta=float(getattr(args, "rotary_base", 10000)),
        max_position_embeddings=int(getattr(args, "max_position_embeddings", 4096)), rope_scaling=scaling,
        layer_windows=windows_from_args(args, int(args.num_layers)),
        **{k: f(args) for k, f in FROM_ARGS.items()},
    )
    misfit = {}
    for family in FAMILIES.values():
        misfit[family.name] = unmatched_features(family, cfg)
        if not misfit[family.name]:
            hf = family.to_hf_config(replace(cfg, family=family.name))
            return family.from_hf_config(hf)
    closest = min(misfit, key=lambda n: len(misfit[n]))
    raise UnsupportedFamily(f"no supported family has this Megatron model's architecture (closest: {closest}, "
                            f"which differs in {misfit[closest]})",
                            fix="pass --hf-config with the matching HF config.json")
