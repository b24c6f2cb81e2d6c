"""DeepSpeed checkpoints (ZeRO 1/2/3, BF16_Optimizer, Megatron-DeepSpeed) to HF and Megatron.

``open_deepspeed`` gives one HF-named source (the hub interface of ckptconv.sources) for any
DeepSpeed checkpoint: plain ZeRO checkpoints of an HF model are read by name
(formats.deepspeed_zero); Megatron-DeepSpeed checkpoints (pipeline layer files, or GPTModel
state dicts with TP) are read as Megatron logical tensors (formats.deepspeed_pipe) and viewed
in HF names through the family tables (MegatronAsHF). The writers are the generic ones.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnknownFormat, UnsupportedFamily
from ..formats.deepspeed_common import is_deepspeed, is_megatron_deepspeed, resolve_tag_dir
from ..formats.deepspeed_megatron_names import check_rotary
from ..formats.deepspeed_pipe import MegatronDeepSpeedReader
from ..formats.deepspeed_zero import WEIGHTS, DeepSpeedZeroSource
from .convert import load_hf_config_arg, source_to_hf, source_to_megatron
from .megatron_as_hf import MegatronAsHF


def open_deepspeed(path: str | Path, tag: str | int | None = None, *, weights: str = "master",
                   hf_config: dict | str | Path | None = None, dtype: torch.dtype | None = None):
    """An HF-named source over a DeepSpeed checkpoint (ROOT with `latest`, or a TAG directory)."""
    path = Path(path)
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}")
    if not is_deepspeed(path):
        raise UnknownFormat("not a DeepSpeed checkpoint (no 'latest' file and no directory with "
                            "*_model_states.pt files)", path=path,
                            fix="point at the directory DeepSpeed's save_checkpoint wrote (or one of its tags)")
    _, tag_dir, _ = resolve_tag_dir(path, tag)
    if not is_megatron_deepspeed(tag_dir):
        return DeepSpeedZeroSource(path, tag, weights=weights, hf_config=hf_config)
    if isinstance(hf_config, (str, Path)):
        hf_config = load_hf_config_arg(hf_config)
    reader = MegatronDeepSpeedReader(path, tag, weights=weights, hf_config=hf_config)
    try:
        if reader.meta.get("hf_config") is None:
            if reader.args is None:
                raise UnsupportedFamily("the checkpoint carries no Megatron args and no config.json was found",
                                        path=reader.iter_dir, fix="pass --hf-config FILE|DIR")
            check_rotary(reader.raw_args)
        return MegatronAsHF(reader, reader.meta.get("hf_config"), dtype)
    except BaseException:
        reader.close()
        raise


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


def deepspeed_to_hf(src: str | Path, dst: str | Path, *, tag: str | int | None = None, weights: str = "master",
                    hf_config: str | Path | None = None, dtype: torch.dtype | None = None, **kwargs) -> dict:
    """Consolidate a DeepSpeed checkpoint into HF safetensors (see source_to_hf for kwargs)."""
    with open_deepspeed(src, tag, weights=weights, hf_config=hf_config, dtype=dtype) as source:
        return source_to_hf(source, dst, dtype=dtype, summary=_summary(source), **kwargs)


def deepspeed_to_megatron(src: str | Path, dst: str | Path, *, tag: str | int | None = None,
                          weights: str = "master", hf_config: str | Path | None = None,
                          dtype: torch.dtype | None = None, **kwargs) -> dict:
    """Convert a DeepSpeed checkpoint to Megatron-Core per-rank files (see source_to_megatron)."""
    with open_deepspeed(src, tag, weights=weights, hf_config=hf_config, dtype=dtype) as source:
        summary = source_to_megatron(source, dst, dtype=dtype, **kwargs)
        return {**_summary(source), **{k: v for k, v in summary.items()}}
