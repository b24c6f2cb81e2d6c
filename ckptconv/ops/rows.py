"""The slice-wise forward of the row-wise ops: which input rows make each run of output rows.

An op with ``row_wise`` puts every output row from one row of one input (or zeros: vocab
padding), so its forward applied to row *indices* says where each output row comes from.
``row_runs`` compresses that into runs: output rows ``[out, out + n)`` are rows ``[at, at + n)``
of input ``src`` (``src == -1``: zero rows). A consumer then produces any slice of the output by
reading only the input rows of the runs that overlap it, never the whole tensor. ``input_runs``
is the other direction: where the rows of one input lie in the output. Ops that move columns
(transpose) have no runs (None): their callers take whole tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import OpContext, get_op


@dataclass(frozen=True)
class Run:
    out: int      # first output row
    src: int      # input index, -1 for zero rows
    at: int       # first row of that input
    n: int        # number of rows


def row_runs(op: str, in_rows: tuple[int, ...], ctx: OpContext) -> tuple[Run, ...] | None:
    """The runs of ``op``'s output for inputs with ``in_rows`` rows each (dim 0), in output order;
    None when the op is not row-wise."""
    impl = get_op(op)
    if not impl.row_wise:
        return None
    base, idx = 0, []
    for n in in_rows:
        idx.append(torch.arange(base + 1, base + n + 1, dtype=torch.int64))
        base += n
    codes = impl.forward(idx, ctx) - 1                 # -1: padding row
    if codes.numel() == 0:
        return ()
    bounds = torch.tensor([0, *in_rows], dtype=torch.int64).cumsum(0)
    src = torch.where(codes >= 0, torch.searchsorted(bounds, codes, right=True) - 1, torch.full_like(codes, -1))
    at = torch.where(codes >= 0, codes - bounds[src.clamp(min=0)], torch.zeros_like(codes))
    # a run breaks where the source changes or the input row does not follow the previous one
    brk = torch.ones_like(codes, dtype=torch.bool)
    brk[1:] = (src[1:] != src[:-1]) | ((src[1:] >= 0) & (at[1:] != at[:-1] + 1))
    starts = torch.nonzero(brk).flatten().tolist() + [codes.numel()]
    s, a = src.tolist(), at.tolist()
    return tuple(Run(b, s[b], a[b], e - b) for b, e in zip(starts[:-1], starts[1:]))


def identity_runs(rows: int) -> tuple[Run, ...]:
    """One input, taken as it is."""
    return (Run(0, 0, 0, rows),) if rows else ()


def input_runs(runs: tuple[Run, ...], k: int) -> tuple[Run, ...]:
    """Where input ``k``'s rows lie in the output, in input-row order: ``Run(out=input row, src=0,
    at=output row, n)`` (the output seen as the one input of input ``k``)."""
    mine = sorted((r for r in runs if r.src == k), key=lambda r: r.at)
    return tuple(Run(r.at, 0, r.out, r.n) for r in mine)


def overlapping(runs: tuple[Run, ...], start: int, stop: int):
    """(run, first output row, stop row) of the runs that overlap output rows ``[start, stop)``."""
    for r in runs:
        lo, hi = max(start, r.out), min(stop, r.out + r.n)
        if lo < hi:
            yield r, lo, hi
