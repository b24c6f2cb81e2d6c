"""The Hugging Face tensors a model of a family must have, from its config alone.

Each Megatron logical tensor's shape follows from the config (``megatron_shapes``); the family's
op turns it back into the HF tensors it is made of (``inverse_shapes``), exactly as a conversion
from Megatron would. A config-only dry-run plans from these metas, for models not on disk.
"""
from __future__ import annotations

import torch

from ..families.schema import Family, ModelConfig
from ..ops import OpContext, get_op
from ..types import TensorMeta
from .megatron_shapes import logical_shape


def expected_hf_tensors(family: Family, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, TensorMeta]:
    """HF name -> meta of every weight tensor of the model (vocab unpadded, tied copies absent)."""
    ctx = OpContext(cfg, cfg.vocab_size)
    out = {}
    for mp in family.expand(cfg):
        shapes = get_op(mp.op).inverse_shapes(logical_shape(mp.megatron, cfg, cfg.vocab_size), ctx)
        out.update((n, TensorMeta(n, tuple(s), dtype)) for n, s in zip(mp.hf, shapes))
    return out
