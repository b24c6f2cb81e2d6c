"""Experts packed the way transformers 5 holds them in memory, read as the hub's per-expert tensors.

transformers 5 keeps an MoE layer's experts as two 3-D parameters,
``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2I, H] (expert e: [gate; up]) and
``...mlp.experts.down_proj`` [E, H, I], and the router as ``model.layers.{i}.mlp.gate.weight``;
``save_pretrained`` writes the per-expert hub layout, but files in the packed form exist too
(a DeepSpeed checkpoint of an HF MoE model holds the in-memory names). ``HubExperts`` wraps any
HF-named source and exposes the family's hub names instead, each read as one expert's slice of
a packed tensor (memory: one expert; one packed tensor where a source cannot slice).
"""
from __future__ import annotations

import torch

from ..families.schema import Family, ModelConfig
from ..plan.experts import expert_index
from ..types import TensorMeta

PACKED_FC1 = "model.layers.{i}.mlp.experts.gate_up_proj"
PACKED_FC2 = "model.layers.{i}.mlp.experts.down_proj"
PACKED_ROUTER = "model.layers.{i}.mlp.gate.weight"


def has_packed_experts(names) -> bool:
    return any(n.endswith(".mlp.experts.gate_up_proj") for n in names)


class HubExperts:
    """An HF-named source whose packed experts read as the hub layout of ``family``."""

    def __init__(self, source, family: Family, cfg: ModelConfig):
        self._source = source
        metas = source.tensors()
        self._virtual: dict[str, tuple[str, int | None, int, int]] = {}   # hub name -> (packed, e, row start, stop)
        for m in family.expand(cfg):
            if not m.megatron.startswith("decoder.layers."):
                continue
            e, layer = expert_index(m.megatron), m.megatron.split(".")[2]
            if e is not None and m.megatron.endswith("linear_fc1.weight") and PACKED_FC1.format(i=layer) in metas:
                packed = PACKED_FC1.format(i=layer)
                half = metas[packed].shape[1] // 2
                self._virtual[m.hf[0]] = (packed, e, 0, half)
                self._virtual[m.hf[1]] = (packed, e, half, 2 * half)
            elif e is not None and m.megatron.endswith("linear_fc2.weight") and PACKED_FC2.format(i=layer) in metas:
                packed = PACKED_FC2.format(i=layer)
                self._virtual[m.hf[0]] = (packed, e, 0, metas[packed].shape[1])
            elif m.megatron.endswith("mlp.router.weight") and m.hf[0] not in metas \
                    and PACKED_ROUTER.format(i=layer) in metas:
                packed = PACKED_ROUTER.format(i=layer)
                self._virtual[m.hf[0]] = (packed, None, 0, metas[packed].shape[0])
        used = {v[0] for v in self._virtual.values()}
        self._metas = {n: m for n, m in metas.items() if n not in used}
        for name, (packed, e, a, b) in self._virtual.items():
            p = metas[packed]
            shape = p.shape if e is None else (b - a, *p.shape[2:])
            self._metas[name] = TensorMeta(name, tuple(shape), p.dtype)

    def __getattr__(self, attr):          # path, config(), asset_files(), close(), ...
        return getattr(self._source, attr)

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def read(self, name: str) -> torch.Tensor:
        v = self._virtual.get(name)
        if v is None:
            return self._source.read(name)
        packed, e, a, b = v
        if e is None:
            return self._source.read(packed)
        if hasattr(self._source, "read_slice"):
            expert = self._source.read_slice(packed, e, e + 1)[0]
        else:
            expert = self._source.read(packed)[e]
        return expert[a:b].contiguous()

    @property
    def rows_readable(self) -> bool:
        """Whether ``read_rows`` reads rows (the source slices) rather than whole tensors."""
        return hasattr(self._source, "read_slice")

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows of a hub-named tensor into ``out`` (not delegated: the names are this view's)."""
        return self.read_slice(name, start, stop, out=out)

    def read_slice(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self._virtual:
            return self._source.read_slice(name, start, stop, out=out)
        t = self.read(name)[start:stop]
        return t if out is None else out.copy_(t)


def with_hub_experts(source, family: Family, cfg: ModelConfig):
    """``source`` itself, or wrapped in ``HubExperts`` when it holds packed experts."""
    return HubExperts(source, family, cfg) if cfg.num_experts and has_packed_experts(source.tensors()) else source
