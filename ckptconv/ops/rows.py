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


_ROW_BITS = 32      # rows per input < 2**32


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
    # row r of input k is coded (k << 32) + r + 1, so a code says its input and row at once (no
    # search over the inputs' bounds); a padding row is a zero row, i.e. code 0
    idx = [torch.arange(1, n + 1, dtype=torch.int64) + (k << _ROW_BITS) for k, n in enumerate(in_rows)]
    codes = impl.forward(idx, ctx)
    if codes.numel() == 0:
        return ()
    pad = codes == 0
    src = torch.where(pad, -1, codes >> _ROW_BITS)
    at = torch.where(pad, 0, (codes & ((1 << _ROW_BITS) - 1)) - 1)
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
