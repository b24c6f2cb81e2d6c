"""Per-tensor checks applied while streaming."""
from __future__ import annotations

import torch

from ..errors import NonFiniteWeights
from ..types import dtype_name

_FIX = "fix the source weights, or pass --allow-nonfinite to convert anyway"


def _count_nonfinite(t: torch.Tensor) -> int:
    flat = t.reshape(-1)
    step = 1 << 22     # count in chunks: a full-size bool mask would cost 1 byte per element
    return sum(int((~torch.isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))


def check_finite(name: str, t: torch.Tensor, path: object, allow: bool,
                 dtype: torch.dtype | None = None) -> None:
    """Refuse NaN/Inf in ``t``, and (``dtype`` given) a cast to ``dtype`` that would turn a finite
    value into Inf. One pass over the tensor (min and max); casting is monotone, so the cast
    overflows iff casting the value of largest magnitude does."""
    if allow or not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)     # one pass, no mask; NaN propagates into lo/hi
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = _count_nonfinite(t)
        if bad:
            raise NonFiniteWeights(f"{bad} NaN/Inf value(s)", path=path, tensor=name, fix=_FIX)
    if dtype is None or dtype == t.dtype or not dtype.is_floating_point:
        return
    ends = torch.stack([lo, hi]).to(dtype)
    if bool(torch.isfinite(ends).all()):
        return
    big = max(abs(float(lo)), abs(float(hi)))
    fmax = torch.finfo(dtype).max
    raise NonFiniteWeights(f"casting to {dtype_name(dtype)} overflows: max |value| {big:.6g} is outside "
                           f"{dtype_name(dtype)}'s range ±{fmax:.6g}", path=path, tensor=name,
                           fix="pick a wider --dtype (e.g. bf16 or fp32), or pass --allow-nonfinite to write Inf")
