"""Each rank loads only its own weights, straight from the checkpoint on disk.

A shard source answers ``get(name)`` with this rank's slice of a Megatron logical tensor
(TE key space, global layer numbers), in the layout a Megatron rank file stores it:
* ``RankFileShards``: a Megatron per-rank ``torch`` checkpoint run at the TP/PP/EP it was
  saved with; rank (t, p, e) opens only ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``
  (safe_pickle) and reads only the byte ranges of its tensors.
* ``LogicalShards``: any reader of Megatron logical tensors (``tensors()``, ``read(name)``):
  other Megatron formats, a Megatron checkpoint run at another TP/PP/EP, or an HF-named source
  seen through its family table (``HFAsMegatron``). The rank reads one logical tensor at a
  time and keeps its TP slice (an expert's: its ETP slice), asking only for its own experts.
``weight_getter`` checks every slice's shape against the config before it is used.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, LayoutError, MissingTensors
from ..families import family_by_name
from ..families.schema import ModelConfig
from ..formats.megatron_names import is_extra_state, to_canonical
from ..formats.megatron_torch import FILE_NAME, model_keys, rank_dir_name
from ..formats.safe_pickle import TorchFile
from ..ops import get_op
from ..plan.megatron_layout import MegatronLayout, tp_kind
from ..plan.megatron_shapes import logical_shape
from ..plan.planner import plan_hf_to_megatron

EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


class RankFileShards:
    """One Megatron per-rank torch file: this rank's tensors, lazily."""

    def __init__(self, iter_dir: Path, layout: MegatronLayout, tp_rank: int, pp_rank: int, ep_rank: int = 0):
        self.where = Path(iter_dir) / rank_dir_name(tp_rank, pp_rank, layout.pp, ep_rank, layout.ep) / FILE_NAME
        if not self.where.is_file():
            at = f"(tp {tp_rank}, pp {pp_rank}" + (f", ep {ep_rank})" if layout.ep > 1 else ")")
            raise MissingTensors(f"rank file of {at} is missing", path=self.where,
                                 fix="copy the complete checkpoint directory")
        self._file = TorchFile(self.where)
        self._lazy = {}
        try:
            for v, key in enumerate(model_keys(layout.chunks)):
                sd = self._file.obj.get(key)
                if not isinstance(sd, dict):
                    raise MissingTensors(f"no '{key}' state dict", path=self.where,
                                         fix="virtual pipeline settings in args do not match the file")
                for local, value in sd.items():
                    if is_extra_state(local) or value is None:
                        continue
                    if not hasattr(value, "load"):
                        raise CorruptCheckpoint(f"entry is a {type(value).__name__}, not a tensor", path=self.where,
                                                tensor=local, fix="the file is not a model checkpoint")
                    self._lazy[layout.global_name(pp_rank, v, to_canonical(local), ep_rank)] = value
        except BaseException:
            self.close()
            raise

    def get(self, name: str) -> torch.Tensor:
        if name not in self._lazy:
            raise MissingTensors("tensor absent from this rank's file", path=self.where, tensor=name,
                                 fix="the checkpoint does not match its args (family, tied embeddings, layers)")
        return self._lazy[name].load()

    def close(self) -> None:
        self._file.close()


class HFAsMegatron:
    """Megatron logical tensors of an HF-named source (see ckptconv.sources), through the
    family table's forward ops, at the padded vocab the runtime uses."""

    def __init__(self, source, cfg: ModelConfig, layout: MegatronLayout, padded_vocab: int,
                 sliceable: bool | None = None):
        """``sliceable``: whether ``source.read_slice`` reads rows (default: whether it has one; a
        wrapper such as HubExperts has the method whatever the source beneath it can do)."""
        self.source, self.root = source, source.path
        self._sliceable = hasattr(source, "read_slice") if sliceable is None else sliceable
        plan = plan_hf_to_megatron(family_by_name(cfg.family), cfg, source.tensors(), layout, padded_vocab)
        self._ctx = plan.ctx
        self._items = {it.megatron.name: it for it in plan.items}

    def tensors(self):
        return {n: it.megatron for n, it in self._items.items()}

    def read(self, name: str) -> torch.Tensor:
        item = self._items[name]
        return get_op(item.op).forward([self.source.read(m.name) for m in item.hf], self._ctx)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (or, for dim 1, columns) ``start:stop`` of ``read(name)``, reading only the
        source rows they come from where the source can slice (HFReader.read_slice)."""
        item, cfg = self._items[name], self._ctx.cfg
        if dim != 0 or not self._sliceable:
            return self.read(name).narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)
        rows = self.source.read_slice
        if item.op == "identity":
            return rows(item.hf[0].name, start, stop)
        if item.op == "vocab":           # real rows, then the zero padding rows
            real = rows(item.hf[0].name, min(start, cfg.vocab_size), min(stop, cfg.vocab_size))
            pad = real.new_zeros((stop - start - real.shape[0], *real.shape[1:]))
            return torch.cat([real, pad]) if pad.shape[0] else real
        if item.op == "gate_up":          # a range inside the gate half or inside the up half
            half = item.megatron.shape[0] // 2
            if stop <= half:
                return rows(item.hf[0].name, start, stop)
            if start >= half:
                return rows(item.hf[1].name, start - half, stop - half)
        if item.op == "qkv":              # whole query groups g0..g1
            per = (cfg.q_per_group + 2) * cfg.head_dim
            if start % per == 0 and stop % per == 0:
                g0, g1, qd, d = start // per, stop // per, cfg.q_per_group * cfg.head_dim, cfg.head_dim
                sub = replace(cfg, num_kv_heads=g1 - g0, num_heads=(g1 - g0) * cfg.q_per_group)
                parts = [rows(item.hf[0].name, g0 * qd, g1 * qd), rows(item.hf[1].name, g0 * d, g1 * d),
                         rows(item.hf[2].name, g0 * d, g1 * d)]
                return get_op("qkv").forward(parts, replace(self._ctx, cfg=sub))
        return self.read(name).narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self.source.close()


class LogicalShards:
    """This rank's TP slices of a logical-tensor reader (one logical tensor in memory at a time)."""

    def __init__(self, reader, layout: MegatronLayout, tp_rank: int, gated_mlp: bool = True):
        self.reader, self.layout, self.tp_rank, self.gated = reader, layout, tp_rank, gated_mlp
        self.where = getattr(reader, "iter_dir", None) or getattr(reader, "root", None)
        self._names = reader.tensors()

    def get(self, name: str) -> torch.Tensor:
        source = name
        if name == OUTPUT and name not in self._names:
            source = EMBEDDING              # tied embeddings: the head is the embedding
        if source not in self._names:
            raise MissingTensors("tensor absent from the checkpoint", path=self.where, tensor=name,
                                 fix="the checkpoint does not match its config")
        shape = tuple(self._names[source].shape)
        ranges = self.layout.pieces(name, tp_kind(name, self.gated), shape, self.tp_rank)
        if hasattr(self.reader, "read_slice"):       # read only this rank's rows / columns
            parts = [self.reader.read_slice(source, d, a, b) for d, a, b in ranges]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=ranges[0][0])
        full = self.reader.read(source)
        parts = [full.narrow(d, a, b - a) for d, a, b in ranges]
        if len(parts) > 1:
            return torch.cat(parts, dim=ranges[0][0])
        # a copy, so that the full logical tensor is freed once this slice is kept
        return full if parts[0].numel() == full.numel() else parts[0].clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self.reader.close()


def weight_getter(shards, cfg: ModelConfig, layout: MegatronLayout, padded_vocab: int, dtype: torch.dtype, device):
    """``get(name)``: this rank's slice, shape-checked, in the execution dtype and device."""
    def get(name: str) -> torch.Tensor:
        t = shards.get(name)
        want = layout.local_shape(name, tp_kind(name, cfg.gated), logical_shape(name, cfg, padded_vocab))
        if tuple(t.shape) != tuple(want):
            split = layout.split(name)
            at = f"ETP={split}" if split != layout.tp else f"TP={split}"
            raise LayoutError(f"this rank holds shape {tuple(t.shape)}, the config needs {tuple(want)} at {at}",
                              path=shards.where, tensor=name,
                              fix="the checkpoint does not match its args/config (TP, heads, ffn, vocab padding)")
        if not t.is_floating_point():
            raise CorruptCheckpoint(f"dtype {t.dtype} is not a floating point weight", path=shards.where,
                                    tensor=name, fix="the checkpoint is corrupt")
        return t.to(device=device, dtype=dtype)
    return get
