"""Per-tensor checks applied while streaming."""
from __future__ import annotations

import torch

from ..errors import NonFiniteWeights


def check_finite(name: str, t: torch.Tensor, path: object, allow: bool) -> None:
    if allow or not t.is_floating_point():
        return
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)     # one pass, no mask; NaN propagates into lo/hi
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    flat = t.reshape(-1)
    step = 1 << 22     # count in chunks: a full-size bool mask would cost 1 byte per element
    bad = sum(int((~torch.isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))
    if bad:
        raise NonFiniteWeights(f"{bad} NaN/Inf value(s)", path=path, tensor=name,
                               fix="fix the source weights, or pass --allow-nonfinite to convert anyway")
