"""ModelConfig <-> Megatron-LM `args` (argparse.Namespace), the way Megatron-LM names them.

The Namespace holds only plain values and torch dtypes, so Megatron's weights-only loaders
accept it and `--use-checkpoint-args` can rebuild the model from it.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from ..errors import UnsupportedFamily
from ..families import family_by_name, family_for_hf
from ..families.schema import ModelConfig
from .megatron_args_fields import check_args_fields
from ..plan.megatron_layout import MegatronLayout


def build_args(cfg: ModelConfig, layout: MegatronLayout, *, padded_vocab: int, divisible_by: int,
               dtype: torch.dtype, impl: str, iteration: int) -> argparse.Namespace:
    scaling = cfg.rope_scaling or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise UnsupportedFamily(f"rope scaling {scaling.get('rope_type')!r} has no Megatron-Core equivalent",
                                path="config.json", fix="only llama3-style rope scaling is supported")
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    odd = {k: scaling[k] for k in fixed if scaling and k in scaling and float(scaling[k]) != fixed[k]}
    if odd:
        raise UnsupportedFamily(f"llama3 rope scaling with {odd}: Megatron-Core hard-codes {fixed}",
                                path="config.json", fix="only the Llama 3.x rope scaling constants are supported")
    gqa = cfg.num_kv_heads != cfg.num_heads
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_heads, kv_channels=cfg.head_dim,
        group_query_attention=gqa, num_query_groups=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=min(cfg.max_position_embeddings, 4096),
        position_embedding_type="rope", use_rotary_position_embeddings=True, add_position_embedding=False,
        rotary_base=cfg.rope_theta, rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=bool(scaling), rope_scaling_factor=float(scaling.get("factor", 8.0)),
        normalization="RMSNorm", norm_epsilon=cfg.norm_eps, apply_layernorm_1p=False, qk_layernorm=False,
        swiglu=True, add_bias_linear=False, add_qkv_bias=cfg.qkv_bias,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_per_virtual_pipeline_stage=(cfg.num_layers // (layout.pp * layout.vpp)) if layout.vpp else None,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        expert_model_parallel_size=1, num_experts=None,
        transformer_impl=impl, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tokenizer_type="HuggingFaceTokenizer", ckpt_format="torch", iteration=iteration,
        consumed_train_samples=0, consumed_valid_samples=0,
    )


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
    if getattr(args, "num_experts", None):
        raise UnsupportedFamily(f"this Megatron model is a Mixture-of-Experts (num_experts={args.num_experts}) and "
                                "no MoE family is known yet", fix="reshard and inspect work on it; HF export and verify of MoE "
                                "checkpoints needs the Mixtral / Qwen-MoE families")
    if getattr(args, "add_bias_linear", False) or not getattr(args, "swiglu", False) \
            or getattr(args, "normalization", "RMSNorm") != "RMSNorm":
        raise UnsupportedFamily("this Megatron model is not Llama-like (bias on linears, no SwiGLU or "
                                "LayerNorm)", fix="pass --hf-config with the matching HF config.json")
    family = family_by_name("qwen2" if getattr(args, "add_qkv_bias", False) else "llama")
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    vocab = getattr(args, "vocab_size", None) or int(args.padded_vocab_size)
    scaling = None
    if getattr(args, "use_rope_scaling", False):
        scaling = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = ModelConfig(
        family=family.name, num_layers=int(args.num_layers), hidden_size=int(args.hidden_size),
        ffn_hidden_size=int(args.ffn_hidden_size), num_heads=heads, num_kv_heads=groups,
        head_dim=int(getattr(args, "kv_channels", None) or int(args.hidden_size) // heads),
        vocab_size=int(vocab), tie_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        qkv_bias=bool(getattr(args, "add_qkv_bias", False)), norm_eps=float(getattr(args, "layernorm_epsilon", None) or getattr(args, "norm_epsilon", 1e-5)),
        rope_theta=float(getattr(args, "rotary_base", 10000)),
        max_position_embeddings=int(getattr(args, "max_position_embeddings", 4096)), rope_scaling=scaling,
    )
    hf = family.to_hf_config(cfg)
    return family.from_hf_config(hf)
