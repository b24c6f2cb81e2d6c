"""The streaming Writer of Megatron-LM per-rank `torch` checkpoints (names and the Reader: see
``megatron_torch``): each rank file's pickle is written up front from the plan, then tensors stream in."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import LayoutError
from ..plan.megatron_layout import MegatronLayout, tp_kind
from ..types import TensorMeta
from .closing import CommitsOnExit
from .megatron_names import extra_state_keys, to_canonical, to_impl
from .megatron_torch import FILE_NAME, LATEST, iteration_dir_name, model_keys, rank_dir_name
from .torch_save_stream import StreamingTorchSave, TensorSlot


class MegatronTorchWriter(CommitsOnExit):
    """Streams logical tensors into per-rank files: each file's pickle is written up front from
    the plan; `write(name, full)` slices the tensor for every rank that holds part of it. ``full``
    may be a row stream (``streams_rows``; engine.rows.RowStream): each rank's piece is then
    written block by block (rows of a dim-0 split, columns of a dim-1 split of every row block)."""

    takes_row_streams = True

    def __init__(self, out_root: Path, layout: MegatronLayout, metas: list[TensorMeta], *, args: Any,
                 iteration: int | str, impl: str, tie_copy: bool, gated_mlp: bool = True,
                 extra: dict | None = None, files: set[tuple[int, int]] | None = None,
                 extra_state: dict[str, dict[int, torch.Tensor]] | None = None):
        # files: write only these (tp_rank, pp_rank, ep_rank) files (one worker's share); None: all
        # extra_state: global `_extra_state` key (TE names) -> {TP rank: tensor} to store; others None
        self.out_root, self.layout, self.impl = Path(out_root), layout, impl
        self.iteration = iteration
        self.gated_mlp = gated_mlp
        it_value = 0 if iteration == "release" else int(iteration)
        self._routes: dict[str, list[tuple[tuple[int, int, int], str, str]]] = {}
        per_file: dict[tuple[int, int, int], list[dict]] = {
            k: [dict() for _ in range(layout.chunks)] for k in layout.rank_files() if files is None or k in files}
        grouped = bool(getattr(args, "moe_grouped_gemm", False))
        moe_layers = {n.split(".mlp.")[0] for n in (m.name for m in metas) if ".mlp.router." in n}
        for meta in metas:
            targets = [(layout.locate(meta.name), meta.name)]
            if tie_copy and meta.name == "embedding.word_embeddings.weight" and layout.pp > 1:
                targets.append((layout.locate("output_layer.weight"), "output_layer.weight"))
            kind = tp_kind(meta.name, gated_mlp)
            lshape = layout.local_shape(meta.name, kind, meta.shape)
            moe = meta.name.split(".mlp.")[0] in moe_layers
            for loc, as_name in targets:
                local = to_impl(loc.local_name if as_name == meta.name else as_name, impl, moe_layer=moe,
                                grouped_gemm=grouped)
                for key in (k for k in layout.holders(loc) if k in per_file):
                    slot = f"{loc.chunk}/{local}"
                    per_file[key][loc.chunk][local] = TensorSlot(slot, lshape, meta.dtype)
                    self._routes.setdefault(meta.name, []).append((key, slot, as_name))
        self._metas = {m.name: m for m in metas}
        self.iter_dir = self.out_root / iteration_dir_name(iteration)
        self._files: dict[tuple[int, int, int], StreamingTorchSave] = {}
        keys = model_keys(layout.chunks)
        carried: dict[tuple[int, int, int], list[tuple[str, torch.Tensor]]] = {}
        for (t, p, e), chunks in per_file.items():
            models = {}
            for v, tensors in enumerate(chunks):
                last = p == layout.pp - 1 and v == layout.chunks - 1
                sd = dict(tensors)
                for k in extra_state_keys(list(tensors), impl, has_output_layer=last):
                    state = (extra_state or {}).get(to_canonical(layout.global_name(p, v, k, e)), {}).get(t)
                    sd[k] = None if state is None else TensorSlot(f"{v}/{k}", tuple(state.shape), state.dtype)
                    if state is not None:
                        carried.setdefault((t, p, e), []).append((f"{v}/{k}", state))
                models[keys[v]] = dict(sorted(sd.items(), key=lambda kv: _state_order(kv[0])))
            template = {"args": args, "checkpoint_version": 3.0, "iteration": it_value, **models,
                        "ckptconv": extra or {}}
            path = self.iter_dir / rank_dir_name(t, p, layout.pp, e, layout.ep) / FILE_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[(t, p, e)] = StreamingTorchSave(path, template)
            for slot, state in carried.get((t, p, e), ()):
                self._files[(t, p, e)].write(slot, state)

    def holds(self, name: str) -> bool:
        """Whether any file of this writer takes (part of) ``name``."""
        return name in self._routes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        meta = self._metas[name]
        if tuple(tensor.shape) != meta.shape:
            raise LayoutError(f"shape {tuple(tensor.shape)} != planned {meta.shape}", tensor=name)
        kind = tp_kind(name, self.gated_mlp)
        streamed = getattr(tensor, "streams_rows", False)
        for key, slot, _ in self._routes.get(name, ()):
            ranges = self.layout.pieces(name, kind, meta.shape, key[0])
            if streamed and (all(d == 0 for d, _, _ in ranges) or len(ranges) == 1):
                self._files[key].write_blocks(slot, _rank_blocks(tensor, ranges))
                continue
            if streamed:
                tensor = tensor.tensor()          # a split this writer cannot stream: whole tensor
                streamed = False
            parts = [tensor.narrow(d, a, b - a) for d, a, b in ranges]
            local = parts[0] if len(parts) == 1 else torch.cat(parts, dim=ranges[0][0])
            self._files[key].write(slot, local.to(meta.dtype).contiguous())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        (self.out_root / LATEST).write_text(str(self.iteration))

    def abort(self) -> None:
        for f in self._files.values():
            f.abort()


def _rank_blocks(stream, ranges):
    """The blocks of one rank's piece of a row stream, in the piece's byte order."""
    for d, a, b in ranges:
        yield from (stream.blocks(a, b) if d == 0 else stream.blocks(0, stream.shape[0], cols=(a, b)))


_ORDER = ["embedding.", "decoder.layers.", "decoder.final_layernorm", "output_layer"]


def _state_order(name: str) -> tuple:
    m = re.match(r"^decoder\.layers\.(\d+)\.", name)
    group = next((i for i, p in enumerate(_ORDER) if name.startswith(p)), len(_ORDER))
    return (group, int(m.group(1)) if m else -1, name)
