"""Per-tensor checks applied while streaming."""
from __future__ import annotations

import torch

from ..errors import NonFiniteWeights


def check_finite(name: str, t: torch.Tensor, path: object, allow: bool) -> None:
    if allow or not t.is_floating_point():
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeights(f"{bad} NaN/Inf value(s)", path=path, tensor=name,
                               fix="fix the source weights, or pass --allow-nonfinite to convert anyway")
