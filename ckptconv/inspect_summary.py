"""The tensor part of every `inspect` report (shared by the per-format inspectors)."""
from __future__ import annotations

from collections import Counter

from .types import TensorMeta, dtype_name


def tensor_summary(metas: dict[str, TensorMeta]) -> dict:
    return {
        "num_tensors": len(metas),
        "num_parameters": sum(m.numel for m in metas.values()),
        "bytes": sum(m.nbytes for m in metas.values()),
        "dtypes": dict(Counter(dtype_name(m.dtype) for m in metas.values())),
        "tensors": {n: {"shape": list(m.shape), "dtype": dtype_name(m.dtype)} for n, m in sorted(metas.items())},
    }
