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

import importlib
from collections.abc import Mapping
from pathlib import Path

from ..errors import UnknownFormat


class LazyRegistry(Mapping):
    """name -> class, each given as "module:attribute" (relative to this package) and imported on
    first lookup: asking which formats exist (``in``, ``sorted``) imports nothing, and the
    torch_dist classes load only when used."""

    def __init__(self, entries: dict[str, str]):
        self._entries, self._loaded = dict(entries), {}

    def __getitem__(self, name: str):
        if name not in self._loaded:
            module, attr = self._entries[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module, __package__), attr)
        return self._loaded[name]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


READERS = LazyRegistry({"megatron_torch": ".megatron_torch:MegatronTorchReader",
                        "megatron_torch_dist": ".megatron_dist:MegatronDistReader"})
WRITERS = LazyRegistry({"torch": ".megatron_torch_write:MegatronTorchWriter",
                        "torch_dist": ".megatron_dist_write:MegatronDistWriter"})


def open_megatron_reader(path: Path, fmt: str, iteration: str | int = "latest"):
    try:
        return READERS[fmt](path, iteration)
    except KeyError:
        raise UnknownFormat(f"{fmt} is not a Megatron checkpoint format", path=path,
                            fix="point at a Megatron checkpoint root") from None


def megatron_writer(ckpt_format: str, *args, **kwargs):
    return WRITERS[ckpt_format](*args, **kwargs)
