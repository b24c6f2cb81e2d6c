"""Megatron checkpoint formats behind one interface.

Readers expose Megatron *logical* tensors (global layer numbers, TE names, TP=1 layout):
`args`, `layout`, `meta` (what ckptconv stored, e.g. the HF config), `iteration`, `root`,
`tensors()`, `read(name)`, `close()`. Writers take the same constructor arguments and stream
logical tensors with `write(name, tensor)`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UnknownFormat
from .megatron_torch import MegatronTorchReader, MegatronTorchWriter

READERS = {"megatron_torch": MegatronTorchReader}
WRITERS = {"torch": MegatronTorchWriter}


def open_megatron_reader(path: Path, fmt: str, iteration: str | int = "latest"):
    try:
        return READERS[fmt](path, iteration)
    except KeyError:
        raise UnknownFormat(f"{fmt} is not a Megatron checkpoint format", path=path,
                            fix="point at a Megatron checkpoint root") from None


def megatron_writer(ckpt_format: str, *args, **kwargs):
    return WRITERS[ckpt_format](*args, **kwargs)
