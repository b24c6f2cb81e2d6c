"""The fast path of the tensor tier: compare a parameter piece by piece, without building the
common-layout tensor on either side.

Each parameter is walked in row pieces of at most RUN_BYTES (cut also at a Megatron side's TP
piece boundaries). A Megatron side reads a piece with ``read_slice`` (only the bytes of each TP
rank's file that hold it); for an HF side in Megatron layout, the family op's forward applied to
row *indices* (``row_map``) says which rows of which HF tensors the piece holds, read as row runs.
A piece that is one contiguous run of a stored record is a zero-copy mapping of the file
(``view_slice`` / ``view_rows``, see ``formats.mapped``); any other lands in two alternating
scratch buffers per side (``Scratch``). No fused / assembled copies, no fresh pages. Any
difference sends the whole group to the slow path (full tensors, figures, diagnosis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import LayoutError
from ..ops import OpContext, get_op
from ..plan.megatron_layout import tp_kind, tp_pieces
from ..types import TensorMeta
from .compare import cast_equal

RUN_BYTES = 4 << 20           # pieces and A's row runs: at most this many bytes (cache-friendly)


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


def row_pieces(name: str, shape: tuple[int, ...], row_bytes: int, sides) -> list[Piece]:
    """How a parameter is walked: runs of at most RUN_BYTES of rows, cut also where a Megatron
    side's TP pieces start (so each piece is one contiguous stretch of one rank's storage)."""
    rows = shape[0] if shape else 0
    cuts = set(range(0, rows, max(1, RUN_BYTES // max(row_bytes, 1))))
    for side in sides:
        if side.kind != "megatron" or side.layout.tp < 2 or not shape:
            continue
        try:
            kind = tp_kind(name)
            cuts |= {a for t in range(side.layout.tp) for d, a, _ in tp_pieces(kind, shape, side.layout.tp, t, name)
                     if d == 0 and kind != "replicated"}
        except LayoutError:
            continue
    bounds = sorted(c for c in cuts if 0 <= c < rows) + [rows]
    return [Piece(name, 0, a, b) for a, b in zip(bounds, bounds[1:])] or [Piece(name, 0, 0, 0)]


class Scratch:
    """Two alternating scratch buffers for one side's reads (pieces that cannot be mapped): task
    k's tensors live in buffer k % 2, so they stay valid while task k + 1 is read (the walk
    compares a piece after both sides have read it). After the first few tasks no read allocates:
    fresh pages cost a page fault and zeroing each, which on a warm page cache was most of
    verify's time before pieces were reused or mapped."""

    ALIGN = 64

    def __init__(self):
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._cur, self._used = 0, 0

    def next_task(self) -> None:
        self._cur, self._used = self._cur ^ 1, 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        start = -(-self._used // self.ALIGN) * self.ALIGN
        buf = self._bufs[self._cur]
        if buf is None or buf.numel() < start + n:     # grow; earlier views keep the old buffer alive
            buf = self._bufs[self._cur] = torch.empty(max(start + n, 2 * (0 if buf is None else buf.numel())),
                                                      dtype=torch.uint8)
        self._used = start + n
        return buf[start:start + n].view(dtype).view(shape)


class PieceReader:
    """Reads pieces of one side in the common layout into its ``Scratch`` buffers (keeps at most
    one whole tensor cached for readers that cannot slice)."""

    def __init__(self, side, space: str, padded: int):
        self.side, self.space, self.padded = side, space, padded
        self._whole: tuple[str, torch.Tensor] | None = None
        self.scratch = Scratch()

    def _slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        s = self.side
        if s.kind == "megatron" and hasattr(s.reader, "read_slice"):
            view = s.reader.view_slice(name, dim, start, stop) if hasattr(s.reader, "view_slice") else None
            return view if view is not None else \
                s.reader.read_slice(name, dim, start, stop, out=self._out(s.meta(name), dim, start, stop))
        src = getattr(s, "source", None)
        if dim == 0 and s.kind != "megatron" and hasattr(src, "read_slice"):
            view = src.view_rows(name, start, stop) if hasattr(src, "view_rows") else None
            return view if view is not None else \
                src.read_slice(name, start, stop, out=self._out(s.hf_meta(name), 0, start, stop))
        if self._whole is None or self._whole[0] != name:
            self._whole = None
            self._whole = (name, s.read(name) if s.kind == "megatron" else src.read(name))
        return self._whole[1].narrow(dim, start, stop - start)

    def _out(self, meta: TensorMeta, dim: int, start: int, stop: int) -> torch.Tensor:
        shape = list(meta.shape)
        shape[dim] = stop - start
        return self.scratch.take(tuple(shape), meta.dtype)

    def runs(self, p: Piece, mapping, in_metas: list | None) -> list[tuple[int, torch.Tensor]]:
        """This side's values of piece ``p`` as (row offset within the piece, tensor) runs
        (vocab padding rows of an HF side in Megatron layout are absent)."""
        if self.side.kind == "megatron" or self.space == "hf" or mapping is None:
            return [(0, self._slice(p.name, p.dim, p.start, p.stop))]
        rows = tuple(m.shape[0] for m in in_metas)
        row_bytes = in_metas[0].nbytes // max(rows[0], 1)
        return [(off, self._slice(mapping.hf[comp], 0, first, first + n)) for off, comp, first, n
                in piece_runs(mapping.op, rows, self.side.cfg, self.padded, p.start, p.stop, row_bytes)]

    def clear(self) -> None:
        self._whole = None


def runs_equal(a_runs: list[tuple[int, torch.Tensor]], b_runs: list[tuple[int, torch.Tensor]],
               rows: int | None) -> bool:
    """A's and B's runs cover piece rows [0, rows) identically and hold equal values (A cast to
    B's dtype, no finite value overflowing). Runs may be cut at different rows on the two sides. ``rows`` None: B's extent."""
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
            if tuple(a.shape) != tuple(b.shape) or not cast_equal(a, b):
                return False
            covered += hi - lo
        if oa + ta.shape[0] <= ob + tb.shape[0]:
            ia += 1
        else:
            ib += 1
    return covered == rows
