"""DeepSpeed ZeRO flat-partition arithmetic (metadata only: ints in, pieces out).

A ZeRO optimizer keeps the fp32 master weights as flat 1-D tensors split over the
data-parallel ranks. Which elements of which rank's flat tensor make up one parameter is
pure arithmetic on the parameter sizes, computed here without touching a tensor:

* Stage 1/2 and BF16_Optimizer: each parameter group is one flat vector of its parameters
  in ``param_shapes`` order (optionally with ``param_alignment_paddings`` after each),
  padded at the end to a multiple of 2 x world; rank r holds the r-th contiguous slice (the
  saved slices may have the end padding removed). A parameter can span several ranks.
* Stage 3: every parameter is split on its own into ceil(numel / world) elements per rank
  (zero padding at the end of the last piece); on each rank the pieces of consecutive
  parameters follow each other through that rank's flat sub-group tensors.

A parameter is described by ``Piece``s (rank, flat group, start, stop): reading them in order
and concatenating gives the parameter's elements exactly, padding already left out.
"""
from __future__ import annotations

from typing import NamedTuple

from ..errors import LayoutError


class Piece(NamedTuple):
    rank: int
    group: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def zero2_align(n: int, world: int) -> int:
    """DeepSpeed aligns each stage 1/2 flat group to 2 x world elements."""
    return 2 * world * ceil_div(n, 2 * world)


def zero3_partition(numel: int, world: int) -> tuple[int, int]:
    """(elements per rank, zero padding at the end of the last rank) of one stage-3 parameter."""
    per = ceil_div(numel, world)
    return per, per * world - numel


def _split(start: int, stop: int, sizes: list[int], make) -> list:
    """Cut the global range [start, stop) of consecutive segments of ``sizes`` into
    (segment index, local start, local stop) pieces."""
    out, base = [], 0
    for i, size in enumerate(sizes):
        lo, hi = max(start, base), min(stop, base + size)
        if lo < hi:
            out.append(make(i, lo - base, hi - base))
        base += size
        if base >= stop:
            break
    return out


def zero12_pieces(groups: list[list[tuple[str, int]]], rank_sizes: list[list[int]],
                  alignment_paddings: list[list[int]] | None = None) -> dict[str, list[Piece]]:
    """Stage 1/2 (and BF16_Optimizer) layout.

    groups: per parameter group, its (name, numel) in param_shapes order.
    rank_sizes: rank_sizes[r][g] = numel of rank r's saved flat tensor of group g.
    alignment_paddings: per group, padding after each parameter (DeepSpeed's
    ``param_alignment_paddings``), or None.
    """
    world = len(rank_sizes)
    if world == 0 or any(len(s) != len(groups) for s in rank_sizes):
        raise LayoutError(f"{len(groups)} parameter groups, but the ranks hold "
                          f"{[len(s) for s in rank_sizes]} flat groups",
                          fix="all optimizer files must come from the same save")
    out: dict[str, list[Piece]] = {}
    for g, params in enumerate(groups):
        sizes = [rank_sizes[r][g] for r in range(world)]
        pads = alignment_paddings[g] if alignment_paddings is not None else [0] * len(params)
        if len(pads) != len(params):
            raise LayoutError(f"group {g}: {len(pads)} alignment paddings for {len(params)} parameters",
                              fix="the model-states and optimizer files do not belong together")
        offset = 0
        for (name, numel), pad in zip(params, pads):
            out[name] = _split(offset, offset + numel, sizes, lambda r, a, b: Piece(r, g, a, b))
            offset += numel + pad
        avail = sum(sizes)
        if offset > avail or zero2_align(offset, world) != zero2_align(avail, world):
            raise LayoutError(f"group {g}: the parameters need {offset} elements but the {world} ranks hold "
                              f"{avail} (sizes {sizes})",
                              fix="the model-states file and the optimizer files do not belong together, "
                                  "or a rank file is from another save")
    return out


def zero3_pieces(params: list[tuple[str, int]], group_sizes: list[int], world: int) -> dict[str, list[Piece]]:
    """Stage 3 layout.

    params: (name, numel) of every partitioned parameter, in param_shapes order (all groups).
    group_sizes: numel of each flat sub-group tensor on a rank (the same on every rank).
    """
    out: dict[str, list[Piece]] = {}
    offset = 0
    for name, numel in params:
        per, _ = zero3_partition(numel, world)
        pieces, left = [], numel
        for r in range(world):
            take = min(per, left)
            if take:
                pieces += _split(offset, offset + take, group_sizes, lambda g, a, b, r=r: Piece(r, g, a, b))
            left -= take
        out[name] = pieces
        offset += per
    if offset != sum(group_sizes):
        raise LayoutError(f"the parameters need {offset} elements per rank but each rank holds "
                          f"{sum(group_sizes)} (flat groups {group_sizes})",
                          fix="the model-states file and the optimizer files do not belong together")
    return out


def fragment_pieces(numel: int, world: int) -> list[Piece]:
    """A stage-3 frozen parameter: rank r's fragment holds its ceil(numel/world) elements
    (group index 0 stands for the fragment tensor itself)."""
    per, _ = zero3_partition(numel, world)
    return [Piece(r, 0, 0, min(per, numel - r * per)) for r in range(world) if numel - r * per > 0]
