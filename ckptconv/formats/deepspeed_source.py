"""``open_deepspeed``: one HF-named source (the hub interface of ckptconv.sources) for any
DeepSpeed checkpoint: plain ZeRO checkpoints of an HF model are read by name
(deepspeed_zero); Megatron-DeepSpeed checkpoints (pipeline layer files, or GPTModel state dicts
with TP) are read as Megatron logical tensors (deepspeed_pipe) and viewed in HF names through
the family tables (MegatronAsHF)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnknownFormat, UnsupportedFamily
from .deepspeed_common import is_deepspeed, is_megatron_deepspeed, resolve_tag_dir
from .deepspeed_megatron_names import check_rotary
from .deepspeed_pipe import MegatronDeepSpeedReader
from .deepspeed_zero import WEIGHTS, DeepSpeedZeroSource
from .hf_config_file import load_hf_config_arg
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
