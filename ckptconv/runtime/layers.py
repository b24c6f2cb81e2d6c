"""Tensor-parallel building blocks, Megatron-Core's semantics, on torch.distributed.

Each layer holds only this rank's slice of its weight, in the layout a Megatron rank file
stores it:
    ColumnParallelLinear  weight [out/tp, in]      output stays split over TP
    RowParallelLinear     weight [out, in/tp]      partial sums all-reduced over TP
    VocabParallelEmbedding weight [V_pad/tp, H]    rows vocab_start.. of the padded vocab
    VocabParallelHead     weight [V_pad/tp, H]     logits gathered over TP -> [.., V_pad]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .parallel import Parallel


class RMSNorm:
    """As in transformers and Megatron-Core: normalise in fp32, scale in the input dtype; with
    ``offset`` 1 (Gemma, Megatron's zero-centred gamma) scale by (1 + w) in fp32."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0, bias: torch.Tensor | None = None):
        self.weight, self.eps, self.offset = weight, eps, offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class LayerNorm:
    """torch's LayerNorm with weight and bias (GPT-2, Megatron's LayerNorm)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0, bias: torch.Tensor | None = None):
        self.weight, self.eps, self.bias = (weight + offset if offset else weight), eps, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activate(h: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """The MLP's middle: act(gate) * up when gated (h = [gate_r; up_r] of this rank), else act(h)."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


class ColumnParallelLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear:
    """Partial products all-reduced over TP; the (whole) bias added once, after the sum."""

    def __init__(self, weight: torch.Tensor, par: Parallel, bias: torch.Tensor | None = None):
        self.weight, self.par, self.bias = weight, par, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.par.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding:
    """Each TP rank looks up the ids in its vocab range, zeros the rest; the sum is the lookup."""

    def __init__(self, weight: torch.Tensor, par: Parallel):
        self.weight, self.par = weight, par
        self.start = par.tp_rank * weight.shape[0]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.par.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class VocabParallelHead:
    """Column-parallel output layer whose vocab slices are gathered into full logits."""

    def __init__(self, weight: torch.Tensor, par: Parallel):
        self.weight, self.par = weight, par

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.par.gather_last_dim(F.linear(x, self.weight))
