"""DeepSpeed checkpoints (ZeRO 1/2/3, BF16_Optimizer, Megatron-DeepSpeed) to HF and Megatron.

Every DeepSpeed checkpoint is one HF-named source (``formats.deepspeed_source.open_deepspeed``);
the writers are the generic ones.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..formats.deepspeed_source import open_deepspeed
from .convert import source_to_hf, source_to_megatron
from .workers import worker_command


def _summary(source) -> dict:
    inner = getattr(source, "reader", source)
    out = {"tag": getattr(inner, "tag", None), "weights": getattr(inner, "weights", None),
           "deepspeed_layout": getattr(inner, "format", None)}
    if hasattr(source, "plan"):
        out.update(source.plan.summary())
    for key in ("stage", "dropped_aliases", "weights_from"):
        if hasattr(inner, key):
            out[key] = getattr(inner, key)
    optim = getattr(inner, "optim", None)
    if optim is not None and getattr(optim, "present", False):
        out.update(optimizer=optim.optimizer, world_size=optim.world)
    return out


@worker_command
def deepspeed_to_hf(src: str | Path, dst: str | Path, *, tag: str | int | None = None, weights: str = "master",
                    hf_config: str | Path | None = None, dtype: torch.dtype | None = None, **kwargs) -> dict:
    """Consolidate a DeepSpeed checkpoint into HF safetensors (see source_to_hf for kwargs)."""
    with open_deepspeed(src, tag, weights=weights, hf_config=hf_config, dtype=dtype) as source:
        return source_to_hf(source, dst, dtype=dtype, summary=_summary(source), **kwargs)


@worker_command
def deepspeed_to_megatron(src: str | Path, dst: str | Path, *, tag: str | int | None = None,
                          weights: str = "master", hf_config: str | Path | None = None,
                          dtype: torch.dtype | None = None, **kwargs) -> dict:
    """Convert a DeepSpeed checkpoint to Megatron-Core per-rank files (see source_to_megatron)."""
    with open_deepspeed(src, tag, weights=weights, hf_config=hf_config, dtype=dtype) as source:
        summary = source_to_megatron(source, dst, dtype=dtype, **kwargs)
        return {**_summary(source), **{k: v for k, v in summary.items()}}
