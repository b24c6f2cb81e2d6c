"""Name the known layout mistake that explains a differing parameter group (pure: tensors in,
sentences out). Every hypothesis is a concrete transform of A's tensors that is checked for
exact equality with B, so a diagnosis is never a guess from statistics:

* q/k/v: k and v of a query group swapped; heads permuted (within or across q/k/v); q/k rows
  in RoPE-interleaved order; fused as plain [Q; K; V] instead of Megatron's per-group order.
* gate/up: swapped; fc1 split over TP as plain row chunks instead of [gate_r; up_r].
* vocab: rows shifted by k; padding rows kept; rows cut.
* Megatron TP shards (fused tensors): shard r duplicates shard s; shards swapped.
* casts: rounded toward zero / ties not to even / to the wrong neighbour.
When nothing explains a difference, it is localised (rows, heads, TP shard).
Cross-layer mistakes (a dropped layer, a pipeline stage offset) are in ``diagnose_layers``.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

from ..families.schema import ModelConfig
from ..ops import OpContext, get_op
from .diagnose_rows import (differing_rows, eq, rounding, shift_message, spans, tp_shards, transposed,
                            vocab_shape)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Context:
    label: str                         # e.g. "layer 3 linear_qkv"
    op: str                            # the family op: identity | qkv | gate_up | vocab
    cfg: ModelConfig                   # A's architecture (heads, groups, head_dim, vocab)
    parts: tuple[str, ...]             # HF names of the components (q, k, v / gate, up / one)
    fused: bool = False                # tensors are Megatron logical (fused, vocab padded)
    tp_kind: str | None = None         # Megatron TP placement of the fused tensor
    tps: tuple[int, ...] = ()          # TP sizes of the Megatron side(s), B's first


_EXPERT_INDEX = re.compile(r"experts\.(?:local_experts\.)?(\d+)\.")


def group_label(names: tuple[str, ...]) -> str:
    m = _LAYER.search(names[0])
    mods = []
    for n in names:
        parts = n.split(".")
        mod = parts[-2] if len(parts) >= 2 else parts[-1]
        mods.append(mod + (" bias" if parts[-1] == "bias" else ""))
    mod = "/".join(dict.fromkeys(mods))
    e = _EXPERT_INDEX.search(names[0])
    mod = f"expert {e.group(1)} {mod}" if e else mod
    return f"layer {m.group(1)} {mod}" if m else mod


def short(name: str) -> str:
    parts = name.split(".")
    mod = (parts[-2] if len(parts) >= 2 else parts[-1]).replace("_proj", "")
    return mod + (" bias" if parts[-1] == "bias" else "")


def diagnose(ctx: Context, a: list, b: list) -> tuple[list[str], list[str]]:
    """(explanations, localisations) of why B differs from A (lists aligned with the group's
    names). Localisations (where the differences are) are given only when nothing explains them."""
    refs = [x.to(y.dtype) if x is not None and y is not None else None for x, y in zip(a, b)]
    found: list[str] = []
    where: list[str] = []
    for r, y in zip(refs, b):
        if r is not None and tuple(r.shape) != tuple(y.shape):
            msg = vocab_shape(ctx.label, r, y) if ctx.op == "vocab" else None
            found += [m for m in (msg or transposed(ctx.label, r, y),) if m]
    if any(r is None or tuple(r.shape) != tuple(y.shape) for r, y in zip(refs, b)):
        return found, []
    comps_r, comps_b = refs, list(b)
    if ctx.fused:
        e, w = tp_shards(ctx.label, ctx.tp_kind, ctx.tps, refs[0], b[0])
        found += e
        where += w
        if ctx.op == "vocab" and not found:
            found += [m for m in (shift_message(ctx.label, refs[0][:ctx.cfg.vocab_size], b[0]),) if m]
        comps_r, comps_b = _split(ctx, refs[0]), _split(ctx, b[0])
    elif ctx.op == "vocab":
        found += [m for m in (vocab_shape(ctx.label, refs[0], b[0]),) if m]
    if not found and comps_r is not None and comps_b is not None:
        found += _swapped(ctx, comps_r, comps_b)
        if not found and ctx.op == "qkv":
            found += _qkv(ctx, comps_r, comps_b)
        if not found and ctx.op == "gate_up":
            found += _gate_up_chunks(ctx, comps_r, comps_b)
    if not found:
        for x, y in zip(a, b):
            msg = rounding(ctx.label, x, y)
            if msg:
                found.append(msg)
    if not found:
        where += _localise(ctx, comps_r if comps_r is not None else refs, comps_b if comps_b is not None else b)
    return found, where


def _split(ctx: Context, t: torch.Tensor) -> list | None:
    if ctx.op == "identity":
        return [t]
    try:
        return get_op(ctx.op).inverse(t, OpContext(ctx.cfg, t.shape[0]))
    except (RuntimeError, ValueError, IndexError):
        return None


def _swapped(ctx: Context, r: list, b: list) -> list[str]:
    out = []
    for i in range(len(r)):
        for j in range(i + 1, len(r)):
            if eq(b[i], r[j]) and eq(b[j], r[i]) and not eq(r[i], r[j]):
                out.append(f"{ctx.label}: {short(ctx.parts[i])} and {short(ctx.parts[j])} swapped")
    return out


def _blocks(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.reshape(-1, d, *t.shape[1:])


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.sha1(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())).digest()


def _qkv(ctx: Context, r: list, b: list) -> list[str]:
    c = ctx.cfg
    d, ng = c.head_dim, c.num_kv_heads
    label, out = ctx.label, []
    op, octx = get_op("qkv"), OpContext(c, 0)
    sizes = [x.shape[0] for x in r]
    try:
        if all(eq(x, y) for x, y in zip(op.inverse(torch.cat(r), octx), b)):
            return [f"{label}: q/k/v fused as plain [Q; K; V] instead of Megatron's per-query-group "
                    f"[q heads, k, v] order"]
        if all(eq(x, y) for x, y in zip(torch.split(op.forward(r, octx), sizes), b)):
            return [f"{label}: q/k/v split as plain [Q; K; V] rows; Megatron's per-query-group order "
                    f"was not undone"]
    except RuntimeError:
        return []
    kb, vb, kr, vr = _blocks(b[1], d), _blocks(b[2], d), _blocks(r[1], d), _blocks(r[2], d)
    groups = [g for g in range(ng) if eq(kb[g], vr[g]) and eq(vb[g], kr[g]) and not eq(kr[g], vr[g])]
    if groups:
        return [f"{label}: query group{'s' if len(groups) > 1 else ''} {spans(groups)} k and v rows swapped"]
    if d % 2 == 0:
        perm = torch.arange(d).view(2, d // 2).t().reshape(-1)
        hit = [n for n, x, y in (("q", r[0], b[0]), ("k", r[1], b[1])) if not eq(x, y) and any(
            eq(_blocks(x, d)[:, p].reshape(x.shape), y) for p in (perm, torch.argsort(perm)))]
        if hit:
            return [f"{label}: {' and '.join(hit)} heads permuted by the RoPE interleave (each head's rows "
                    f"in interleaved-pair order instead of rotate-half)"]
    return out + _heads(ctx, r, b)


def _heads(ctx: Context, r: list, b: list) -> list[str]:
    """Match B's head blocks to A's (across q, k, v) and describe any permutation."""
    d = ctx.cfg.head_dim
    names = ("q", "k", "v")
    where = {}
    for ci, x in enumerate(r):
        for h, blk in enumerate(_blocks(x, d)):
            where.setdefault(_digest(blk), (ci, h))
    out = []
    for ci, y in enumerate(b):
        if eq(r[ci], y):
            continue
        got = [where.get(_digest(blk)) for blk in _blocks(y, d)]
        if any(g is None for g in got):
            continue
        moved = [(h, g) for h, g in enumerate(got) if g != (ci, h)]
        if all(g[0] == ci for _, g in moved):
            out.append(f"{ctx.label}: {names[ci]} heads permuted (B heads {', '.join(str(h) for h, _ in moved)} "
                       f"hold A heads {', '.join(str(g[1]) for _, g in moved)})")
        else:
            src = ", ".join(f"{names[g[0]]}{g[1]}" for _, g in moved[:8])
            out.append(f"{ctx.label}: B's {names[ci]} heads {spans([h for h, _ in moved])} hold A's heads "
                       f"{src}{', …' if len(moved) > 8 else ''} (q/k/v rows mixed up)")
    return out


def _gate_up_chunks(ctx: Context, r: list, b: list) -> list[str]:
    fused = torch.cat(r)
    f = r[0].shape[0]
    for tp in ctx.tps:
        if tp < 2 or f % tp:
            continue
        n = f // tp
        gate = torch.cat([fused[k * 2 * n:k * 2 * n + n] for k in range(tp)])
        up = torch.cat([fused[k * 2 * n + n:(k + 1) * 2 * n] for k in range(tp)])
        if eq(gate, b[0]) and eq(up, b[1]):
            return [f"{ctx.label}: fc1 split over TP={tp} as plain row chunks of [gate; up] instead of "
                    f"per-rank [gate_r; up_r]"]
    return []


def _localise(ctx: Context, r: list, b: list) -> list[str]:
    out = []
    d = ctx.cfg.head_dim
    for name, x, y in zip(ctx.parts if len(ctx.parts) == len(r) else [ctx.label] * len(r), r, b):
        rows = differing_rows(x, y)
        if not rows:
            continue
        text = f"{ctx.label}: {short(name)} differs in rows {spans(rows)} of {x.shape[0] if x.dim() else 1}"
        if ctx.op == "qkv" and d:
            text += f" (heads {spans(sorted({i // d for i in rows}))})"
        out.append(text)
    return out
