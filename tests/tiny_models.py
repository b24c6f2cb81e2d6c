"""Tiny Hugging Face models built from configs with fixed seeds (no hub downloads)."""
from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=8, vocab_size=250, max_position_embeddings=256,
            rms_norm_eps=1e-5)

VARIANTS = {
    # name: (config class name, overrides)
    "llama-gqa": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama-mha": ("LlamaConfig", {"num_key_value_heads": 8}),
    "llama-mqa": ("LlamaConfig", {"num_key_value_heads": 1}),
    "llama3-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192},
                    "max_position_embeddings": 16384}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"vocab_size": 250}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "llama-3layer": ("LlamaConfig", {"num_hidden_layers": 3}),
    "mistral-window": ("MistralConfig", {"sliding_window": 5}),
    "qwen2-window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),          # head_dim != hidden / heads: kv_channels
    "qwen3-tied": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5},
                         "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48,
                                  "sliding_window": None}),
    "qwen2-moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                     "shared_expert_intermediate_size": 40, "mlp_only_layers": [0],
                                     "norm_topk_prob": False}),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                     "norm_topk_prob": True, "head_dim": 16}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 4, "n_head": 8, "n_positions": 256, "vocab_size": 250}),
    # small soft-caps and a query_pre_attn_scalar != head_dim so that each of them shows in the logits
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 5,
                                "attn_logit_softcapping": 0.02, "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 5,
                                    "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}),
}
NO_BASE = {"GPT2Config"}        # configs whose keys are not Llama's


def build_model(variant: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    import transformers

    cls_name, over = VARIANTS[variant]
    cfg = getattr(transformers, cls_name)(**{**({} if cls_name in NO_BASE else BASE), **over})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():   # make norms and biases non-trivial so mix-ups show in logits
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".mlp.gate.weight"):     # MoE router: decisive top-k, no near-ties
                p.mul_(10.0)
    return model.to(dtype).eval()


def save_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def tokens(vocab: int = 250, batch: int = 2, seq: int = 12, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(path_or_model, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = path_or_model
    if isinstance(path_or_model, (str, Path)):
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    return model.float().eval()(ids).logits
