"""A Hugging Face-named logical view of any supported checkpoint, for comparisons.

Hugging Face layout is the hub between ecosystems: a Megatron checkpoint is seen through its
family table's inverse ops, one mapping (e.g. a fused QKV) at a time, streaming.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..families import family_by_name, family_for_hf
from ..families.schema import Mapping
from ..formats.detect import detect_format
from ..formats.hf import HFReader
from ..formats.megatron_args import config_from_args
from ..formats.megatron_torch import MegatronTorchReader
from ..ops import OpContext, get_op
from ..plan.planner import plan_megatron_to_hf
from ..types import TensorMeta


class HFView:
    def __init__(self, path: str | Path, iteration: str = "latest", hf_config: dict | None = None):
        self.path = Path(path)
        self.format = detect_format(self.path)
        if self.format == "hf":
            self._hf = HFReader(self.path)
            self.family = family_for_hf(self._hf.config(), self.path / "config.json")
            self.cfg = self.family.from_hf_config(self._hf.config())
            self.metas: dict[str, TensorMeta] = self._hf.tensors()
            self.groups: list[Mapping] = self.family.expand(self.cfg)
            self._mg = None
        else:
            self._mg = MegatronTorchReader(self.path, iteration)
            self.cfg = config_from_args(self._mg.args, hf_config or self._mg.meta.get("hf_config"))
            self.family = family_by_name(self.cfg.family)
            padded = int(self._mg.tensors()["embedding.word_embeddings.weight"].shape[0])
            plan = plan_megatron_to_hf(self.family, self.cfg, self._mg.tensors(), self._mg.layout, padded)
            self._ctx = OpContext(self.cfg, padded)
            self._items = {it.megatron.name: it for it in plan.items}
            self.metas = {m.name: m for it in plan.items for m in it.hf}
            self.groups = self.family.expand(self.cfg)
            self._hf = None

    def read_group(self, mapping: Mapping) -> dict[str, torch.Tensor]:
        present = [n for n in mapping.hf if n in self.metas]
        if self._hf is not None:
            return {n: self._hf.read(n) for n in present}
        item = self._items.get(mapping.megatron)
        if item is None:
            return {}
        outs = get_op(item.op).inverse(self._mg.read(mapping.megatron), self._ctx)
        return {m.name: x for m, x in zip(item.hf, outs)}

    def close(self) -> None:
        (self._hf or self._mg).close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
