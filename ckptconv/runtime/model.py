"""The decoder, built from a ModelConfig's architecture features and this rank's weights.

One block for every family: the norm kind and offset (RMSNorm, LayerNorm with bias, 1 + w),
the activation and gating of the MLP, biases, learned or rotary (partial, scaled, per-layer
base) positions, q/k norm, sandwich norms, embedding scale, attention and final soft-capping,
softmax scale, per-layer sliding windows and, in Mixture-of-Experts layers, the router rule,
experts and shared expert (``runtime.moe``) all come from ``cfg`` (see families.schema).

Weights are asked for by their Megatron logical names (TE key space, global layer numbers;
``NAMES``) and arrive in the rank-local layout Megatron stores (see ``ckptconv.runtime.loader``):
fused QKV grouped by query group, fc1 = [gate_r; up_r] (gated) or rows r (plain).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UnsupportedFamily
from ..families.schema import ModelConfig
from .layers import (ACTIVATIONS, NORMS, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     VocabParallelHead, activate)
from .moe import MoE
from .parallel import Parallel

GetWeight = Callable[[str], torch.Tensor]

# Megatron logical names the block reads (Megatron-Bridge's names for the sandwich norms).
NAMES = {
    "word": "embedding.word_embeddings.weight", "position": "embedding.position_embeddings.weight",
    "final_norm": "decoder.final_layernorm.", "head": "output_layer.weight",
    "norm1": "self_attention.linear_qkv.layer_norm_", "norm2": "mlp.linear_fc1.layer_norm_",
    "post_attn_norm": "self_attention.linear_proj.post_layernorm.", "post_mlp_norm": "mlp.linear_fc2.post_layernorm.",
    "q_norm": "self_attention.q_layernorm.", "k_norm": "self_attention.k_layernorm.",
    "qkv": "self_attention.linear_qkv.", "proj": "self_attention.linear_proj.",
    "mlp": "mlp.",
}


def make_norm(cfg: ModelConfig, get: GetWeight, prefix: str, sep: str = ""):
    """The norm whose weight is ``prefix + 'weight'`` (and bias, for LayerNorm)."""
    bias = get(prefix + sep + "bias") if cfg.norm == "layernorm" else None
    return NORMS[cfg.norm](get(prefix + sep + "weight"), cfg.norm_eps, cfg.norm_offset, bias)


def rotary_dim(cfg: ModelConfig) -> int:
    return int(cfg.head_dim * cfg.rotary_percent)


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] in fp32, with the scaling transformers applies."""
    d = rotary_dim(cfg)
    inv = 1.0 / ((theta or cfg.rope_theta) ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
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


def rope_tables(cfg: ModelConfig, seq: int, device, dtype, theta: float | None = None):
    """cos, sin [seq, rotary_dim], computed in fp32 and cast to the execution dtype."""
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), rope_inv_freq(cfg, theta))
    emb = torch.cat([freqs, freqs], dim=-1).to(device)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of each head (the rest pass through)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


def attention_mask(seq: int, window: int | None, device) -> torch.Tensor:
    """[seq, seq] bool, True = may attend: causal, and within the window if there is one."""
    i = torch.arange(seq, device=device)
    delta = i[:, None] - i[None, :]
    keep = delta >= 0
    return keep & (delta < window) if window else keep


class Tables:
    """Per-forward RoPE tables (one per base) and masks (one per window), made on first use."""

    def __init__(self, cfg: ModelConfig, seq: int, device, dtype):
        self.cfg, self.seq, self.device, self.dtype = cfg, seq, device, dtype
        self._rope: dict = {}
        self._mask: dict = {}

    def rope(self, theta: float):
        if theta not in self._rope:
            self._rope[theta] = rope_tables(self.cfg, self.seq, self.device, self.dtype, theta)
        return self._rope[theta]

    def mask(self, window: int | None):
        if window not in self._mask:
            self._mask[window] = attention_mask(self.seq, window, self.device)
        return self._mask[window]


class Attention:
    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, prefix: str, window: int | None):
        self.cfg, self.window = cfg, window
        self.groups = cfg.num_kv_heads // par.tp
        self.per_group, self.head_dim = cfg.q_per_group, cfg.head_dim
        qkv, proj = prefix + NAMES["qkv"], prefix + NAMES["proj"]
        self.qkv = ColumnParallelLinear(get(qkv + "weight"), get(qkv + "bias") if cfg.qkv_bias else None)
        self.proj = RowParallelLinear(get(proj + "weight"), par, get(proj + "bias") if cfg.linear_bias else None)
        self.q_norm = make_norm(cfg, get, prefix + NAMES["q_norm"]) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, get, prefix + NAMES["k_norm"]) if cfg.qk_norm else None
        local = window and cfg.rope_local_theta
        self.theta = cfg.rope_local_theta if local else cfg.rope_theta

    def __call__(self, x, tables: Tables):
        b, s, _ = x.shape
        g, n, d = self.groups, self.per_group, self.head_dim
        qkv = self.qkv(x).view(b, s, g, n + 2, d)           # rows grouped: [q_g (n heads), k_g, v_g]
        q = qkv[:, :, :, :n].reshape(b, s, g * n, d).transpose(1, 2)
        k = qkv[:, :, :, n].transpose(1, 2)
        v = qkv[:, :, :, n + 1].transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.position == "rope":
            cos, sin = tables.rope(self.theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        mask = tables.mask(self.window)
        if self.cfg.attn_softcap:
            cap = self.cfg.attn_softcap
            scores = torch.tanh(q @ k.transpose(-1, -2) * self.cfg.softmax_scale / cap) * cap
            probs = scores.masked_fill(~mask, float("-inf")).float().softmax(-1).to(q.dtype)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.cfg.softmax_scale)
        return self.proj(out.transpose(1, 2).reshape(b, s, g * n * d))


class MLP:
    """fc2(act(gate) * up) when gated (fc1 = [gate_r; up_r]), else fc2(act(fc1)); ``prefix`` +
    linear_fc1/linear_fc2 (the dense MLP's ``mlp.``, or an MoE layer's ``mlp.shared_experts.``)."""

    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, prefix: str):
        fc1, fc2 = prefix + "linear_fc1.", prefix + "linear_fc2."
        bias = cfg.linear_bias
        self.fc1 = ColumnParallelLinear(get(fc1 + "weight"), get(fc1 + "bias") if bias else None)
        self.fc2 = RowParallelLinear(get(fc2 + "weight"), par, get(fc2 + "bias") if bias else None)
        self.act, self.gated = ACTIVATIONS[cfg.activation], cfg.gated

    def __call__(self, x):
        return self.fc2(activate(self.fc1(x), self.act, self.gated))


def _identity(x):
    return x


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, index: int):
        p = f"decoder.layers.{index}."
        self.index, self.window = index, cfg.window(index)
        self.norm1 = make_norm(cfg, get, p + NAMES["norm1"])
        self.attn = Attention(cfg, par, get, p, self.window)
        self.norm2 = make_norm(cfg, get, p + NAMES["norm2"])
        if cfg.is_moe_layer(index):       # router + experts (+ shared expert): runtime.moe
            self.mlp = MoE(cfg, par, get, p, lambda shared: MLP(cfg, par, get, shared))
        else:
            self.mlp = MLP(cfg, par, get, p + NAMES["mlp"])
        sandwich = cfg.sandwich_norm
        self.post_attn = make_norm(cfg, get, p + NAMES["post_attn_norm"]) if sandwich else _identity
        self.post_mlp = make_norm(cfg, get, p + NAMES["post_mlp_norm"]) if sandwich else _identity

    def __call__(self, x, tables: Tables):
        h = x + self.post_attn(self.attn(self.norm1(x), tables))
        return h + self.post_mlp(self.mlp(self.norm2(h)))


class ModelChunk:
    """One virtual-pipeline chunk of one stage: [embedding] -> layers -> [final norm -> head]."""

    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, layers: list[int],
                 first: bool, last: bool):
        self.cfg, self.first, self.last = cfg, first, last
        emb = get(NAMES["word"]) if first else None
        self.embedding = VocabParallelEmbedding(emb, par) if first else None
        self.positions = get(NAMES["position"]) if first and cfg.position == "learned_absolute" else None
        self.layers = [DecoderLayer(cfg, par, get, i) for i in layers]
        self.final_norm = self.head = None
        if last:
            self.final_norm = make_norm(cfg, get, NAMES["final_norm"])
            tied_here = cfg.tie_embeddings and first
            self.head = VocabParallelHead(emb if tied_here else get(NAMES["head"]), par)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        if self.positions is not None:
            x = x + F.embedding(torch.arange(ids.shape[1], device=ids.device), self.positions)
        if self.cfg.embedding_scale:
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype)
        return x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, tables: Tables) -> torch.Tensor:
        """ids [b, s] (first chunk) or hidden [b, s, H] -> hidden, or padded logits (last chunk)."""
        if self.embedding is not None:
            x = self.embed(x)
        for layer in self.layers:
            x = layer(x, tables)
        if self.head is not None:
            x = self.head(self.final_norm(x))
            if self.cfg.final_softcap:
                x = torch.tanh(x / self.cfg.final_softcap) * self.cfg.final_softcap
        return x
