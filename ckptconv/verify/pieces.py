"""The fast path of the tensor tier: compare a parameter piece by piece, without building the
common-layout tensor on either side.

B (the checkpoint under test) is read in its storage pieces (one TP shard's rows or columns via
``read_slice``, when its reader offers it; else whole). For each piece, the family op's forward
applied to row *indices* (``row_map``) says which rows of which of A's tensors it must equal, so
A is read as matching row runs (``read_slice`` on A too) and compared as contiguous views: no
fused / assembled copies, and small reads that the allocator recycles. Any difference sends the
whole group to the slow path (full tensors, figures, diagnosis).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import LayoutError
from ..ops import OpContext, get_op
from ..plan.megatron_layout import tp_kind, tp_pieces
from .compare import values_equal

RUN_BYTES = 16 << 20          # A is read in row runs of at most this many bytes


@dataclass(frozen=True)
class Piece:
    name: str                 # the common-layout name of the parameter
    dim: int                  # 0: rows start:stop; 1: columns start:stop (all rows)
    start: int
    stop: int


@lru_cache(maxsize=64)
def row_map(op: str, in_rows: tuple[int, ...], cfg, padded: int) -> torch.Tensor:
    """For each row of the op's output: the row in the concatenation of its inputs (-1: padding)."""
    base, idx = 0, []
    for n in in_rows:
        idx.append(torch.arange(base + 1, base + n + 1, dtype=torch.int64))
        base += n
    return get_op(op).forward(idx, OpContext(cfg, padded)) - 1


@lru_cache(maxsize=256)
def piece_runs(op: str, in_rows: tuple[int, ...], cfg, padded: int, start: int, stop: int,
               row_bytes: int) -> tuple[tuple[int, int, int, int], ...]:
    """(row offset in the piece, input index, first input row, count) for the stretches of output
    rows start:stop that are consecutive rows of one input; padding rows are skipped; a stretch is
    at most RUN_BYTES."""
    codes = row_map(op, in_rows, cfg, padded)[start:stop]
    n = codes.numel()
    if n == 0:
        return ()
    bounds = torch.tensor([0, *in_rows], dtype=torch.int64).cumsum(0)
    valid = codes >= 0
    comp = torch.where(valid, torch.searchsorted(bounds, codes, right=True) - 1, torch.full_like(codes, -1))
    cut = torch.ones(n, dtype=torch.bool)
    cut[1:] = (comp[1:] != comp[:-1]) | (codes[1:] != codes[:-1] + 1)
    cut |= ~valid
    edges = cut.nonzero().flatten().tolist() + [n]
    cap = max(1, RUN_BYTES // max(row_bytes, 1))
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        if not bool(valid[a]):
            continue
        c, first = int(comp[a]), int(codes[a] - bounds[comp[a]])
        for k in range(a, b, cap):
            out.append((k, c, first + k - a, min(cap, b - k)))
    return tuple(out)


def storage_pieces(name: str, shape: tuple[int, ...], side, row_bytes: int) -> list[Piece]:
    """How a parameter is walked: the TP pieces of a Megatron side whose reader slices (they are
    its storage chunks), row chunks of an HF side, else the whole tensor in one piece."""
    rows = shape[0] if shape else 0
    reader = getattr(side, "reader", None)
    if side.kind == "megatron":
        if not hasattr(reader, "read_slice") or side.layout.tp < 2 or not shape:
            return [Piece(name, 0, 0, rows)]
        try:
            kind = tp_kind(name)
            ranges = [r for t in range(side.layout.tp) for r in tp_pieces(kind, shape, side.layout.tp, t, name)]
        except LayoutError:
            return [Piece(name, 0, 0, rows)]
        return [Piece(name, 0, 0, rows)] if kind == "replicated" else [Piece(name, d, a, b) for d, a, b in ranges]
    step = max(1, RUN_BYTES // max(row_bytes, 1))
    return [Piece(name, 0, a, min(a + step, rows)) for a in range(0, rows, step)] or [Piece(name, 0, 0, 0)]


class PieceReader:
    """Reads pieces of one side in the common layout (keeps at most one whole tensor cached)."""

    def __init__(self, side, space: str, padded: int):
        self.side, self.space, self.padded = side, space, padded
        self._whole: tuple[str, torch.Tensor] | None = None

    def _slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        s = self.side
        if s.kind == "megatron" and hasattr(s.reader, "read_slice"):
            return s.reader.read_slice(name, dim, start, stop)
        src = getattr(s, "source", None)
        if dim == 0 and s.kind != "megatron" and hasattr(src, "read_slice"):
            return src.read_slice(name, start, stop)
        if self._whole is None or self._whole[0] != name:
            self._whole = None
            self._whole = (name, s.read(name) if s.kind == "megatron" else src.read(name))
        return self._whole[1].narrow(dim, start, stop - start)

    def runs(self, p: Piece, mapping, in_metas: list | None) -> list[tuple[int, torch.Tensor]]:
        """This side's values of piece ``p`` as (row offset within the piece, tensor) runs
        (vocab padding rows of an HF side in Megatron layout are absent)."""
        if self.side.kind == "megatron" or self.space == "hf" or mapping is None:
            return [(0, self._slice(p.name, p.dim, p.start, p.stop))]
        if p.dim == 1:           # a row-parallel piece of an identity-mapped tensor
            return [(0, self._slice(mapping.hf[0], 1, p.start, p.stop))]
        rows = tuple(m.shape[0] for m in in_metas)
        row_bytes = in_metas[0].nbytes // max(rows[0], 1)
        return [(off, self._slice(mapping.hf[comp], 0, first, first + n)) for off, comp, first, n
                in piece_runs(mapping.op, rows, self.side.cfg, self.padded, p.start, p.stop, row_bytes)]

    def clear(self) -> None:
        self._whole = None


def runs_equal(a_runs: list[tuple[int, torch.Tensor]], b_runs: list[tuple[int, torch.Tensor]],
               rows: int | None) -> bool:
    """A's and B's runs cover piece rows [0, rows) identically and hold equal values (A cast to
    B's dtype). Runs may be cut at different rows on the two sides. ``rows`` None: B's extent."""
    if rows is None:
        rows = sum(t.shape[0] for _, t in b_runs)
    covered = 0
    ia = ib = 0
    while ia < len(a_runs) and ib < len(b_runs):
        (oa, ta), (ob, tb) = a_runs[ia], b_runs[ib]
        lo = max(oa, ob)
        hi = min(oa + ta.shape[0], ob + tb.shape[0], rows)
        if hi > lo:
            a, b = ta.narrow(0, lo - oa, hi - lo), tb.narrow(0, lo - ob, hi - lo)
            if tuple(a.shape) != tuple(b.shape) or not values_equal(a.to(b.dtype), b):
                return False
            covered += hi - lo
        if oa + ta.shape[0] <= ob + tb.shape[0]:
            ia += 1
        else:
            ib += 1
    return covered == rows
