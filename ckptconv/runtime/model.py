"""The Llama-family decoder (Llama, Mistral, Qwen2) built from a ModelConfig and this rank's
weights: RMSNorm, RoPE (rotate-half, optional llama3 / linear scaling), grouped-query
attention with optional qkv bias and sliding window, SwiGLU MLP, tied or untied head.

Weights are asked for by their Megatron logical names (TE key space, global layer numbers)
and arrive in the rank-local layout Megatron stores (see ``ckptconv.runtime.loader``):
fused QKV grouped by query group, fc1 = [gate_r; up_r].
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UnsupportedFamily
from ..families.schema import ModelConfig
from .layers import (ColumnParallelLinear, RMSNorm, RowParallelLinear, VocabParallelEmbedding,
                     VocabParallelHead)
from .parallel import Parallel

GetWeight = Callable[[str], torch.Tensor]


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with the scaling transformers applies."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedFamily(f"rope scaling {kind!r} is not supported by the bundled runtime", path="config.json",
                            fix="supported: default, linear, llama3")


def rope_tables(cfg: ModelConfig, seq: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq, head_dim], computed in fp32 and cast to the execution dtype."""
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), rope_inv_freq(cfg))
    emb = torch.cat([freqs, freqs], dim=-1).to(device)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def sliding_window(cfg: ModelConfig, layer: int) -> int | None:
    """The attention window of global layer ``layer`` as the HF config defines it, or None."""
    hf = cfg.hf_config or {}
    window = hf.get("sliding_window")
    if not window:
        return None
    if hf.get("layer_types"):
        return window if hf["layer_types"][layer] == "sliding_attention" else None
    if cfg.family == "mistral":
        return window
    if hf.get("use_sliding_window"):
        return window if layer >= int(hf.get("max_window_layers", 0)) else None
    return None


def attention_mask(seq: int, window: int | None, device) -> torch.Tensor:
    """[seq, seq] bool, True = may attend: causal, and within the window if there is one."""
    i = torch.arange(seq, device=device)
    delta = i[:, None] - i[None, :]
    keep = delta >= 0
    return keep & (delta < window) if window else keep


class Attention:
    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, prefix: str):
        self.groups = cfg.num_kv_heads // par.tp
        self.per_group, self.head_dim = cfg.q_per_group, cfg.head_dim
        bias = get(prefix + "linear_qkv.bias") if cfg.qkv_bias else None
        self.qkv = ColumnParallelLinear(get(prefix + "linear_qkv.weight"), bias)
        self.proj = RowParallelLinear(get(prefix + "linear_proj.weight"), par)

    def __call__(self, x, cos, sin, mask):
        b, s, _ = x.shape
        g, n, d = self.groups, self.per_group, self.head_dim
        qkv = self.qkv(x).view(b, s, g, n + 2, d)           # rows grouped: [q_g (n heads), k_g, v_g]
        q = qkv[:, :, :, :n].reshape(b, s, g * n, d).transpose(1, 2)
        k = qkv[:, :, :, n].transpose(1, 2)
        v = qkv[:, :, :, n + 1].transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(b, s, g * n * d))


class SwiGLU:
    def __init__(self, par: Parallel, get: GetWeight, prefix: str):
        self.fc1 = ColumnParallelLinear(get(prefix + "linear_fc1.weight"))   # [gate_r; up_r]
        self.fc2 = RowParallelLinear(get(prefix + "linear_fc2.weight"), par)

    def __call__(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, index: int):
        p = f"decoder.layers.{index}."
        self.index, self.window = index, sliding_window(cfg, index)
        self.norm1 = RMSNorm(get(p + "self_attention.linear_qkv.layer_norm_weight"), cfg.norm_eps)
        self.attn = Attention(cfg, par, get, p + "self_attention.")
        self.norm2 = RMSNorm(get(p + "mlp.linear_fc1.layer_norm_weight"), cfg.norm_eps)
        self.mlp = SwiGLU(par, get, p + "mlp.")

    def __call__(self, x, cos, sin, masks):
        h = x + self.attn(self.norm1(x), cos, sin, masks[self.window])
        return h + self.mlp(self.norm2(h))


class ModelChunk:
    """One virtual-pipeline chunk of one stage: [embedding] -> layers -> [final norm -> head]."""

    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, layers: list[int],
                 first: bool, last: bool):
        self.cfg, self.first, self.last = cfg, first, last
        emb = get("embedding.word_embeddings.weight") if first else None
        self.embedding = VocabParallelEmbedding(emb, par) if first else None
        self.layers = [DecoderLayer(cfg, par, get, i) for i in layers]
        self.final_norm = self.head = None
        if last:
            self.final_norm = RMSNorm(get("decoder.final_layernorm.weight"), cfg.norm_eps)
            tied_here = cfg.tie_embeddings and first
            self.head = VocabParallelHead(emb if tied_here else get("output_layer.weight"), par)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cos, sin, masks) -> torch.Tensor:
        """ids [b, s] (first chunk) or hidden [b, s, H] -> hidden, or padded logits (last chunk)."""
        if self.embedding is not None:
            x = self.embedding(x)
        for layer in self.layers:
            x = layer(x, cos, sin, masks)
        if self.head is not None:
            x = self.head(self.final_norm(x))
        return x
