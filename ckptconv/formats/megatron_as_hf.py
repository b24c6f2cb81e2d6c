"""A Hugging Face-named view of a Megatron logical reader, through the family's inverse ops.

Reading `q_proj` reads the fused `linear_qkv` once and keeps its other outputs (k, v) until
they are asked for, so a consumer that walks the family table in order reads every Megatron
tensor exactly once; at most one group is held.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..families import family_by_name
from .closing import ClosesOnExit
from .megatron_args import config_from_args
from ..ops import get_op
from ..ops.rows import input_runs, overlapping, row_runs
from ..plan.planner import Plan, PlanItem, plan_megatron_to_hf
from ..types import TensorMeta

HF_ASSETS_DIR = "hf_assets"     # inside a Megatron checkpoint root: the source HF config + tokenizer files


class MegatronAsHF(ClosesOnExit):
    def __init__(self, reader, hf_config: dict | None = None, dtype: torch.dtype | None = None):
        self.reader = reader
        self.path = Path(reader.root)
        carried = reader.meta.get("hf_config")
        self.cfg = config_from_args(reader.args, hf_config or carried)
        self.family = family_by_name(self.cfg.family)
        self._config = dict(hf_config or carried or self.family.to_hf_config(self.cfg))
        padded = int(getattr(reader.args, "padded_vocab_size", 0) or
                     reader.tensors()["embedding.word_embeddings.weight"].shape[0])
        self.plan: Plan = plan_megatron_to_hf(self.family, self.cfg, reader.tensors(), reader.layout, padded, dtype)
        self._items: dict[str, PlanItem] = {m.name: it for it in self.plan.items for m in it.hf}
        self._group: tuple[str, dict[str, torch.Tensor]] | None = None
        self._row_runs: dict[str, tuple] = {}
        self._mg_metas = reader.tensors()
        self.rows_readable = hasattr(reader, "read_slice")     # read_rows reads rows, not whole tensors

    def config(self) -> dict:
        return dict(self._config)

    def tensors(self) -> dict[str, TensorMeta]:
        return {name: next(m for m in it.hf if m.name == name) for name, it in self._items.items()}

    def read(self, name: str) -> torch.Tensor:
        item = self._items[name]
        if self._group is None or self._group[0] != item.megatron.name or name not in self._group[1]:
            full = self.reader.read(item.megatron.name)
            outs = get_op(item.op).inverse(full, self.plan.ctx)
            self._group = (item.megatron.name, {m.name: x for m, x in zip(item.hf, outs)})
        tensor = self._group[1].pop(name)
        if not self._group[1]:
            self._group = None
        return tensor

    def stored_meta(self, name: str) -> TensorMeta:
        """HF tensor ``name`` as ``read_rows`` reads it: its shape, the Megatron tensor's stored dtype
        (``tensors()`` says the dtype of the output, after a --dtype cast)."""
        item = self._items[name]
        meta = next(m for m in item.hf if m.name == name)
        return TensorMeta(name, meta.shape, self._mg_metas[item.megatron.name].dtype)

    def reads_rows_of(self, name: str) -> bool:
        """Whether ``read_rows(name, ...)`` reads rows rather than the whole Megatron tensor."""
        item = self._items[name]
        return self.rows_readable and get_op(item.op).row_wise and all(m.shape for m in item.hf)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of HF tensor ``name`` read into ``out`` straight from the rows of the
        Megatron tensor that holds them (the op's row map, ``ops.rows``): no fused tensor is read
        whole; an op that is not row-wise reads it whole."""
        item = self._items[name]
        runs = self._row_runs.get(name)
        if runs is None:
            k = [m.name for m in item.hf].index(name)
            fwd = row_runs(item.op, tuple(m.shape[0] for m in item.hf), self.plan.ctx) \
                if all(m.shape for m in item.hf) else None
            runs = self._row_runs[name] = () if fwd is None else input_runs(fwd, k)
        if not runs:
            return out.copy_(self.read(name)[start:stop])
        stored = self._mg_metas[item.megatron.name].dtype
        for run, lo, hi in overlapping(runs, start, stop):
            first = run.at + lo - run.out
            dst = out[lo - start:hi - start]
            if dst.dtype == stored:
                self.reader.read_slice(item.megatron.name, 0, first, first + hi - lo, out=dst)
            else:               # a --dtype cast: the stored rows, then cast
                dst.copy_(self.reader.read_slice(item.megatron.name, 0, first, first + hi - lo))
        return out

    def check_integrity_in_background(self, part: tuple[int, int] | None = None) -> None:
        """The reader's integrity check on a thread, when its format has one (torch_dist)."""
        start = getattr(self.reader, "check_integrity_in_background", None)
        if start is not None:
            start(part)

    def verify_integrity(self) -> None:
        done = getattr(self.reader, "verify_integrity", None)
        if done is not None:
            done()

    def asset_files(self) -> list[Path]:
        d = self.path / HF_ASSETS_DIR
        return [f for f in sorted(d.iterdir()) if f.name != "config.json"] if d.is_dir() else []

    def close(self) -> None:
        self._group = None
        self.reader.close()
