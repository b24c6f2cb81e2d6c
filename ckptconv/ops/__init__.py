"""Pure tensor transforms between HF tensors and Megatron logical (TP=1) tensors.

Every op has ``forward(hf_tensors) -> megatron_tensor`` and ``inverse(megatron_tensor) ->
hf_tensors``; ``inverse(forward(x)) == x`` exactly. ``forward_shape`` gives the result shape
from input shapes alone so plans are made without touching tensor bytes. No I/O and no
inter-process communication here.

``row_wise``: every output row is one row of one input (so the op applied to row indices maps
rows, as verify's piecewise fast path needs); False for ops that move columns (transpose).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families.schema import ModelConfig


@dataclass(frozen=True)
class OpContext:
    cfg: ModelConfig
    padded_vocab: int


class Identity:
    row_wise = True

    def forward(self, xs, ctx):
        (x,) = xs
        return x

    def inverse(self, t, ctx):
        return [t]

    def forward_shape(self, shapes, ctx):
        (s,) = shapes
        return tuple(s)

    def inverse_shapes(self, shape, ctx):
        return [tuple(shape)]


class FuseQKV:
    """[Q; K; V] (HF) <-> Megatron's per-query-group interleave [q_g.., k_g, v_g] for g in groups.

    Works for weights ([rows, H]) and biases ([rows]) alike: only dim 0 is rearranged.
    """

    row_wise = True

    @staticmethod
    def _dims(ctx):
        c = ctx.cfg
        return c.num_kv_heads, c.q_per_group * c.head_dim, c.head_dim

    def forward(self, xs, ctx):
        q, k, v = xs
        g, qd, d = self._dims(ctx)
        rest = q.shape[1:]
        parts = [q.reshape(g, qd, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
        return torch.cat(parts, dim=1).reshape(g * (qd + 2 * d), *rest)

    def inverse(self, t, ctx):
        g, qd, d = self._dims(ctx)
        rest = t.shape[1:]
        grouped = t.reshape(g, qd + 2 * d, *rest)
        q, k, v = torch.split(grouped, [qd, d, d], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]

    def forward_shape(self, shapes, ctx):
        q, k, v = shapes
        return (q[0] + k[0] + v[0], *q[1:])

    def inverse_shapes(self, shape, ctx):
        g, qd, d = self._dims(ctx)
        rest = tuple(shape[1:])
        return [(g * qd, *rest), (g * d, *rest), (g * d, *rest)]


class FuseGateUp:
    """gate, up (HF) <-> [gate; up] (Megatron fc1 at TP=1; glu applies act to the first half)."""

    row_wise = True

    def forward(self, xs, ctx):
        gate, up = xs
        return torch.cat([gate, up], dim=0)

    def inverse(self, t, ctx):
        gate, up = torch.chunk(t, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]

    def forward_shape(self, shapes, ctx):
        gate, up = shapes
        return (gate[0] + up[0], *gate[1:])

    def inverse_shapes(self, shape, ctx):
        return [(shape[0] // 2, *shape[1:])] * 2


class PadVocab:
    """[V, H] (HF) <-> [padded V, H] (Megatron); padding rows are zeros and dropped on the way back."""

    row_wise = True

    def forward(self, xs, ctx):
        (x,) = xs
        extra = ctx.padded_vocab - x.shape[0]
        if extra == 0:
            return x
        return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))], dim=0)

    def inverse(self, t, ctx):
        return [t[: ctx.cfg.vocab_size].contiguous()]

    def forward_shape(self, shapes, ctx):
        (s,) = shapes
        return (ctx.padded_vocab, *s[1:])

    def inverse_shapes(self, shape, ctx):
        return [(ctx.cfg.vocab_size, *shape[1:])]


class SplitQKV:
    """One fused HF [Q; K; V] tensor (Phi-3 qkv_proj, GPT-2 c_attn rows / bias) <-> Megatron's
    per-query-group interleave: split the rows [nq*d, ng*d, ng*d], then FuseQKV."""

    row_wise = True

    def _sizes(self, ctx):
        c = ctx.cfg
        return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]

    def forward(self, xs, ctx):
        (x,) = xs
        return FuseQKV().forward(list(torch.split(x, self._sizes(ctx), dim=0)), ctx)

    def inverse(self, t, ctx):
        return [torch.cat(FuseQKV().inverse(t, ctx), dim=0)]

    def forward_shape(self, shapes, ctx):
        (s,) = shapes
        return tuple(s)

    def inverse_shapes(self, shape, ctx):
        return [tuple(shape)]


class Transpose:
    """HF Conv1D weight [in, out] (GPT-2) <-> a Linear weight [out, in]."""

    row_wise = False

    def forward(self, xs, ctx):
        (x,) = xs
        return x.t().contiguous()

    def inverse(self, t, ctx):
        return [t.t().contiguous()]

    def forward_shape(self, shapes, ctx):
        (s,) = shapes
        return tuple(reversed(s))

    def inverse_shapes(self, shape, ctx):
        return [tuple(reversed(shape))]


class Chain:
    """``first`` then ``second`` (a one-tensor op): forward composes, inverse undoes in reverse."""

    def __init__(self, first, second):
        self.first, self.second = first, second
        self.row_wise = first.row_wise and second.row_wise

    def forward(self, xs, ctx):
        return self.second.forward([self.first.forward(xs, ctx)], ctx)

    def inverse(self, t, ctx):
        (mid,) = self.second.inverse(t, ctx)
        return self.first.inverse(mid, ctx)

    def forward_shape(self, shapes, ctx):
        return self.second.forward_shape([self.first.forward_shape(shapes, ctx)], ctx)

    def inverse_shapes(self, shape, ctx):
        (mid,) = self.second.inverse_shapes(shape, ctx)
        return self.first.inverse_shapes(mid, ctx)


OPS = {"identity": Identity(), "qkv": FuseQKV(), "gate_up": FuseGateUp(), "vocab": PadVocab(),
       "qkv_fused": SplitQKV(), "transpose": Transpose(), "qkv_fused_t": Chain(Transpose(), SplitQKV())}


def get_op(name: str):
    return OPS[name]
