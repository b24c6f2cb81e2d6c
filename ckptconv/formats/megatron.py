"""Megatron checkpoint formats behind one interface.

Readers expose Megatron *logical* tensors (global layer numbers, TE names, TP=1 layout):
    root, iter_dir, iteration, args (Namespace), layout (MegatronLayout), impl (key space),
    meta (what ckptconv stored: {"hf_config", "family", ...}), common (non-tensor state:
    checkpoint_version, optimizer, rng_state, ...), extra_state (list of `_extra_state` keys),
    tensors() -> {name: TensorMeta}, read(name) -> full logical tensor, close(); context manager.
Writers: Writer(out_root, layout, metas, *, args, iteration, impl, tie_copy, extra) with
write(name, full_logical_tensor) in any order, close()/abort(); context manager.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UnknownFormat
from .megatron_dist import MegatronDistReader
from .megatron_dist_write import MegatronDistWriter
from .megatron_torch import MegatronTorchReader, MegatronTorchWriter

READERS = {"megatron_torch": MegatronTorchReader, "megatron_torch_dist": MegatronDistReader}
WRITERS = {"torch": MegatronTorchWriter, "torch_dist": MegatronDistWriter}


def open_megatron_reader(path: Path, fmt: str, iteration: str | int = "latest"):
    try:
        return READERS[fmt](path, iteration)
    except KeyError:
        raise UnknownFormat(f"{fmt} is not a Megatron checkpoint format", path=path,
                            fix="point at a Megatron checkpoint root") from None


def megatron_writer(ckpt_format: str, *args, **kwargs):
    return WRITERS[ckpt_format](*args, **kwargs)
