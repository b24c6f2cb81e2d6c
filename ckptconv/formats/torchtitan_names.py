"""torchtitan's Llama 3 parameter names <-> Hugging Face names, as one table.

Read off torchtitan's own `Llama3StateDictAdapter` (torchtitan/models/llama3/state_dict_adapter.py):
each row is (torchtitan pattern, HF pattern, op). ``{}`` is the layer index. torchtitan keeps
q/k in the interleaved-pair RoPE order of Meta's original checkpoints; its ``to_hf`` applies
HF's permutation (``_permute``: per head, view (2-element pairs) -> (half, half)) to ``wq``
with the attention heads and to ``wk`` with the key/value heads, and ``from_hf`` the inverse.
``rope_to_hf`` / ``rope_from_hf`` below are those two functions; one undoes the other exactly
(they only move elements).

torchtitan 0.3.0 splits the fused projection into ``attention.qkv_linear.{wq,wk,wv}``; earlier
releases name them ``attention.{wq,wk,wv}``. Both are read; ``write`` names follow 0.3.0.
A tied ``lm_head.weight`` is dropped on the way to HF (as ``to_hf`` does when weights are tied)
and added back as a copy of the embedding on the way to torchtitan (as ``from_hf`` does).
"""
from __future__ import annotations

import re

import torch

# (torchtitan, HF, op); op None: identity, "q"/"k": the RoPE permutation with the q / kv heads
TABLE: tuple[tuple[str, str, str | None], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", None),
    ("layers.{}.attention.qkv_linear.wq.weight", "model.layers.{}.self_attn.q_proj.weight", "q"),
    ("layers.{}.attention.qkv_linear.wk.weight", "model.layers.{}.self_attn.k_proj.weight", "k"),
    ("layers.{}.attention.qkv_linear.wv.weight", "model.layers.{}.self_attn.v_proj.weight", None),
    ("layers.{}.attention.wo.weight", "model.layers.{}.self_attn.o_proj.weight", None),
    ("layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight", None),
    ("layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight", None),
    ("layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight", None),
    ("layers.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight", None),
    ("layers.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight", None),
    ("norm.weight", "model.norm.weight", None),
    ("lm_head.weight", "lm_head.weight", None),
)
# torchtitan before 0.3.0: the same projections without the fused container
ALIASES = {"layers.{}.attention.wq.weight": "layers.{}.attention.qkv_linear.wq.weight",
           "layers.{}.attention.wk.weight": "layers.{}.attention.qkv_linear.wk.weight",
           "layers.{}.attention.wv.weight": "layers.{}.attention.qkv_linear.wv.weight"}
ANCHOR = "tok_embeddings.weight"

_TO_HF = {tt: (hf, op) for tt, hf, op in TABLE}
_FROM_HF = {hf: (tt, op) for tt, hf, op in TABLE}
_LAYER = re.compile(r"\.(\d+)\.")


def _abstract(name: str) -> tuple[str, str | None]:
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + ".{}." + name[m.end():], m.group(1)


def to_hf_name(name: str) -> tuple[str, str | None] | None:
    """(HF name, op) of a torchtitan name, or None if the table has no row for it."""
    pattern, layer = _abstract(name)
    row = _TO_HF.get(ALIASES.get(pattern, pattern))
    if row is None:
        return None
    return row[0].format(layer) if layer is not None else row[0], row[1]


def from_hf_name(name: str) -> tuple[str, str | None] | None:
    """(torchtitan name, op) of an HF name, or None if the table has no row for it."""
    pattern, layer = _abstract(name)
    row = _FROM_HF.get(pattern)
    if row is None:
        return None
    return row[0].format(layer) if layer is not None else row[0], row[1]


def rope_heads(op: str, cfg: dict) -> int:
    """How many heads the permutation of ``op`` ("q" or "k") runs over, from an HF config."""
    heads = int(cfg["num_attention_heads"])
    return heads if op == "q" else int(cfg.get("num_key_value_heads") or heads)


def rope_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """torchtitan's ``_permute``: rows of each head from interleaved pairs to two halves."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def rope_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """torchtitan's ``_reverse_permute``: the inverse of ``rope_to_hf``."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def apply(op: str | None, w: torch.Tensor, cfg: dict, *, to_hf: bool) -> torch.Tensor:
    if op is None:
        return w
    return (rope_to_hf if to_hf else rope_from_hf)(w, rope_heads(op, cfg))
