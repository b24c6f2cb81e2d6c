"""Small frozen value types shared by every layer (no I/O here)."""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorMeta:
    """What a reader knows about one tensor from headers alone."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
               "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'auto'/None -> None (keep the source dtype), else a torch dtype."""
    if name is None or name == "auto":
        return None
    return DTYPE_NAMES[name]


def dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        dt, str(dt).replace("torch.", ""))
