"""Row-level explanations of a difference (pure: tensors in, sentences out): vocab rows shifted
or padding kept, TP shards duplicated or swapped, values rounded the wrong way, and where the
differences are when nothing explains them."""
from __future__ import annotations

import torch

from ..errors import LayoutError
from ..plan.megatron_layout import tp_pieces
from .compare import values_equal

_ROW_CHUNK = 4096
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def eq(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    return x is not None and y is not None and tuple(x.shape) == tuple(y.shape) and values_equal(x, y)


def spans(idx: list[int], limit: int = 4) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8' (at most ``limit`` spans, then '…')."""
    out: list[str] = []
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out[:limit]) + (", …" if len(out) > limit else "")


def differing_rows(ref: torch.Tensor, b: torch.Tensor) -> list[int]:
    if ref.dim() == 0:
        return [0] if not eq(ref, b) else []
    rows = []
    for s in range(0, ref.shape[0], _ROW_CHUNK):
        x, y = ref[s:s + _ROW_CHUNK], b[s:s + _ROW_CHUNK]
        ne = x != y
        if x.is_floating_point():
            ne &= ~(torch.isnan(x) & torch.isnan(y))
        ne = ne.reshape(ne.shape[0], -1).any(dim=1)
        rows += (ne.nonzero().flatten() + s).tolist()
    return rows


def find_rows(rows: torch.Tensor, row: torch.Tensor, limit: int = 8) -> list[int]:
    """Indices of ``rows`` equal to ``row`` (chunked, so temporaries stay small)."""
    hits: list[int] = []
    for s in range(0, rows.shape[0], _ROW_CHUNK):
        m = (rows[s:s + _ROW_CHUNK] == row).reshape(min(_ROW_CHUNK, rows.shape[0] - s), -1).all(dim=1)
        hits += (m.nonzero().flatten() + s).tolist()
        if len(hits) >= limit:
            break
    return hits[:limit]


def vocab_shift(ref: torch.Tensor, b: torch.Tensor) -> int | None:
    """k != 0 such that B row i+k holds A row i for (at least half of) A's rows, else None."""
    if ref.dim() != 2 or b.dim() != 2 or ref.shape[1] != b.shape[1] or ref.shape[0] < 2:
        return None
    v, nb = ref.shape[0], b.shape[0]
    candidates: set[int] = set()
    for probe in (0, v // 2, v - 1):
        if bool((ref[probe] != 0).any()):
            candidates.update(h - probe for h in find_rows(b, ref[probe]))
    for k in sorted(candidates - {0}, key=abs):
        lo, hi = max(0, -k), min(v, nb - k)
        if hi - lo >= max(1, v // 2) and eq(b[lo + k:hi + k], ref[lo:hi]):
            return k
    return None


def vocab_shape(label: str, ref: torch.Tensor, b: torch.Tensor) -> str | None:
    """Explain a vocab-row count mismatch: padding kept, or rows lost."""
    if ref.dim() != 2 or b.dim() != 2 or ref.shape[1] != b.shape[1]:
        return None
    va, vb = ref.shape[0], b.shape[0]
    if vb > va and eq(b[:va], ref):
        return (f"{label}: B keeps {vb - va} vocab padding rows ({va}-{vb - 1}); the padding was not "
                f"removed")
    if vb < va and eq(b, ref[:vb]):
        return f"{label}: B lacks vocab rows {vb}-{va - 1} (cut to {vb} rows)"
    return shift_message(label, ref, b)


def shift_message(label: str, ref: torch.Tensor, b: torch.Tensor) -> str | None:
    k = vocab_shift(ref, b)
    if k is None:
        return None
    return f"{label}: vocab rows shifted by {abs(k)} (B row i{k:+d} holds A row i)"


def tp_piece(t: torch.Tensor, kind: str, tp: int, rank: int) -> torch.Tensor:
    ranges = tp_pieces(kind, tuple(t.shape), tp, rank)
    parts = [t.narrow(d, a, b - a) for d, a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=ranges[0][0])


def tp_shards(label: str, kind: str | None, tps: tuple[int, ...], ref: torch.Tensor,
              b: torch.Tensor) -> tuple[list[str], list[str]]:
    """(explanations, localisations) in terms of Megatron TP shards of the fused tensor."""
    if kind in (None, "replicated") or tuple(ref.shape) != tuple(b.shape):
        return [], []
    for tp in tps:
        if tp < 2:
            continue
        try:
            rp = [tp_piece(ref, kind, tp, r) for r in range(tp)]
            bp = [tp_piece(b, kind, tp, r) for r in range(tp)]
        except LayoutError:
            continue
        same = [eq(x, y) for x, y in zip(rp, bp)]
        if all(same):
            continue
        found = []
        for r in (r for r in range(tp) if not same[r]):
            for s in range(tp):
                if s != r and same[s] and eq(bp[r], bp[s]) and not eq(rp[r], rp[s]) and _nonzero(bp[s]):
                    found.append(f"{label}: TP shard {r} duplicates shard {s} (TP={tp})")
                elif s > r and not same[s] and eq(bp[r], rp[s]) and eq(bp[s], rp[r]):
                    found.append(f"{label}: TP shards {r} and {s} swapped (TP={tp})")
        if found:
            return found, []
        bad = [r for r in range(tp) if not same[r]]
        return [], [f"{label}: differences only in TP shard{'s' if len(bad) > 1 else ''} "
                    f"{spans(bad)} of {tp}"] if len(bad) < tp else []
    return [], []


def _nonzero(t: torch.Tensor) -> bool:
    return bool((t != 0).any())


def _neighbour(x: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
    """The value one ulp from ``x`` (in x's dtype) in the direction of ``toward``."""
    it = _INT[x.dtype.itemsize]
    bits = x.view(it).to(torch.int64)
    sign_bit = 1 << (8 * x.dtype.itemsize - 1)
    up = toward.double() > x.double()
    grow = up ^ (x < 0)
    nxt = torch.where(grow, bits + 1, bits - 1)
    zero = torch.where(toward.double() < 0, torch.full_like(bits, sign_bit | 1), torch.ones_like(bits))
    nxt = torch.where(x == 0, zero, nxt)
    nxt = torch.where(nxt >= sign_bit, nxt - 2 * sign_bit, nxt)      # back to signed range
    return nxt.to(it).view(x.dtype)


def rounding(label: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Explain a cast that is not round-to-nearest-even (A wider than B)."""
    if not (a.is_floating_point() and b.is_floating_point()) or a.dtype.itemsize <= b.dtype.itemsize \
            or b.dtype.itemsize not in _INT or tuple(a.shape) != tuple(b.shape):
        return None
    ref = a.to(b.dtype)
    ne = (ref != b) & ~(torch.isnan(ref) & torch.isnan(b))
    n = int(ne.sum())
    if n == 0:
        return None
    av, rv, bv = a[ne], ref[ne], b[ne]
    if not torch.equal(_neighbour(rv, av), bv):
        return None
    ad, rd, bd = av.double(), rv.double(), bv.double()
    if bool((ad == rd).any()):          # exactly representable values have one right answer only
        return None
    of = f"{n} of {b.numel()} elements"
    if torch.equal((ad - rd).abs(), (ad - bd).abs()):
        return f"{label}: {of} are ties rounded away from even (round-half-to-even was not used)"
    if bool((bd.abs() <= ad.abs()).all()):
        return (f"{label}: {of} rounded toward zero (truncated) instead of to nearest even, "
                f"one ulp off")
    return f"{label}: {of} rounded to the wrong neighbour, one ulp off the correctly rounded value"


def transposed(label: str, ref: torch.Tensor, b: torch.Tensor) -> str | None:
    if ref.dim() == 2 and tuple(ref.shape[::-1]) == tuple(b.shape) and eq(ref.t(), b):
        return f"{label}: stored transposed"
    return None
