"""Megatron-LM per-rank `torch` checkpoints: Reader and streaming Writer.

    ROOT/latest_checkpointed_iteration.txt   "release" or N
    ROOT/release/ | ROOT/iter_%07d/
        mp_rank_TT/model_optim_rng.pt        (PP == 1)
        mp_rank_TT_PPP/model_optim_rng.pt    (PP > 1)

Each file: {"model" | "model0".., "args", "checkpoint_version", "iteration", ...}. Tensors are
exposed as Megatron *logical* tensors: global layer numbers, TE key space, TP=1 layout.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CorruptCheckpoint, LayoutError, MissingTensors
from ..plan.megatron_layout import MegatronLayout, local_shape, tp_kind, tp_pieces
from ..types import TensorMeta
from .megatron_args import layout_from_args
from .megatron_names import extra_state_keys, is_extra_state, to_canonical, to_impl
from .safe_pickle import TorchFile
from .torch_save_stream import StreamingTorchSave, TensorSlot
from .closing import ClosesOnExit, CommitsOnExit

FILE_NAME = "model_optim_rng.pt"
LATEST = "latest_checkpointed_iteration.txt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def model_keys(chunks: int) -> list[str]:
    return ["model"] if chunks == 1 else [f"model{v}" for v in range(chunks)]


def is_iteration_dir(path: Path) -> bool:
    return path.is_dir() and any(RANK_DIR.match(p.name) for p in path.iterdir())


def resolve_iteration_dir(root: Path, iteration: str | int = "latest", *,
                          is_iter_dir: Callable[[Path], bool] = is_iteration_dir,
                          holds: str = "mp_rank_* directories") -> Path:
    """ROOT + latest|release|N -> the iteration directory (ROOT itself if it is one);
    ``is_iter_dir`` tells an iteration directory of the format at hand."""
    root = Path(root)
    if is_iter_dir(root):
        return root
    if str(iteration) == "latest":
        marker = root / LATEST
        if not marker.is_file():
            raise CorruptCheckpoint(f"no {LATEST} in a Megatron checkpoint root", path=root,
                                    fix="pass --iteration release|N, or point at the iter_* directory")
        iteration = marker.read_text().strip()
    try:
        name = iteration_dir_name("release" if str(iteration) == "release" else int(iteration))
    except ValueError:
        raise CorruptCheckpoint(f"iteration {str(iteration)[:40]!r} is neither 'release' nor a number",
                                path=root / LATEST, fix="pass --iteration release|N") from None
    path = root / name
    if not is_iter_dir(path):
        raise MissingTensors(f"iteration directory {name} is missing or holds no {holds}",
                             path=path, fix=f"check {LATEST} or pass --iteration")
    return path


class MegatronTorchReader(ClosesOnExit):
    """Lazily reads a per-rank checkpoint: only the pickles are parsed at open time."""

    format = "megatron_torch"

    def __init__(self, root: Path, iteration: str | int = "latest"):
        self.root = Path(root)
        self.iter_dir = resolve_iteration_dir(self.root, iteration)
        grid: dict[tuple[int, int], Path] = {}
        for d in sorted(self.iter_dir.iterdir()):
            m = RANK_DIR.match(d.name)
            if m:
                grid[(int(m.group(1)), int(m.group(2) or 0))] = d / FILE_NAME
        self._files: dict[tuple[int, int], TorchFile] = {}
        try:
            self._open(grid)
        except BaseException:
            self.close()
            raise

    def _open(self, grid: dict[tuple[int, int], Path]) -> None:
        first = grid.get((0, 0))
        if first is None or not first.is_file():
            raise MissingTensors("rank (tp 0, pp 0) is missing", path=self.iter_dir / "mp_rank_00*",
                                 fix="copy the complete checkpoint directory")
        self._files[(0, 0)] = TorchFile(first)
        head = self._files[(0, 0)].obj
        if "args" not in head:
            raise CorruptCheckpoint("no 'args' in the rank file", path=first,
                                    fix="checkpoints without args are not supported; re-save with Megatron-LM")
        self.args = head["args"]
        self.layout: MegatronLayout = layout_from_args(self.args)
        self.layout.check()
        for t in range(self.layout.tp):
            for p in range(self.layout.pp):
                path = grid.get((t, p))
                want = self.iter_dir / rank_dir_name(t, p, self.layout.pp) / FILE_NAME
                if path is None or not path.is_file():
                    raise MissingTensors(f"TP={self.layout.tp} PP={self.layout.pp} checkpoint lacks rank (tp {t}, pp {p})",
                                         path=want, fix="copy the missing mp_rank directory")
                if (t, p) not in self._files:
                    self._files[(t, p)] = TorchFile(path)
        extra = sorted(set(grid) - set(self._files))
        if extra:
            raise LayoutError(f"rank directories {extra} do not fit TP={self.layout.tp} PP={self.layout.pp} from args",
                              path=self.iter_dir, fix="remove stray mp_rank directories")
        self.iteration = head.get("iteration")
        for key, f in self._files.items():
            if f.obj.get("iteration") != self.iteration:
                raise LayoutError(f"mixed iterations: rank {key} holds {f.obj.get('iteration')}, rank (0, 0) "
                                  f"holds {self.iteration}", path=f.path,
                                  fix="do not mix rank files from different saves")
        self.meta: dict = head.get("ckptconv") or {}
        # non-tensor state of rank (0, 0): args, checkpoint_version, optimizer, rng_state, ...
        self.common: dict = {k: v for k, v in head.items() if not k.startswith("model")}
        self._catalog()

    def _catalog(self) -> None:
        lay = self.layout
        self.impl = "transformer_engine"
        self.extra_state: list[str] = []
        self._pieces: dict[str, dict[int, Any]] = {}
        keys = model_keys(lay.chunks)
        for (t, p), f in sorted(self._files.items()):
            for v, key in enumerate(keys):
                sd = f.obj.get(key)
                if sd is None:
                    raise MissingTensors(f"no '{key}' state dict", path=f.path,
                                         fix="virtual pipeline settings in args do not match the file")
                for local, value in sd.items():
                    if "input_layernorm" in local or "pre_mlp_layernorm" in local:
                        self.impl = "local"
                    if is_extra_state(local) or value is None:
                        self.extra_state.append(lay.global_name(p, v, local))
                        continue
                    if not hasattr(value, "load"):
                        raise CorruptCheckpoint(f"entry is a {type(value).__name__}, not a tensor",
                                                path=f.path, tensor=local, fix="the file is not a model checkpoint")
                    name = to_canonical(lay.global_name(p, v, local))
                    self._pieces.setdefault(name, {})
                    if t in self._pieces[name]:
                        raise LayoutError("tensor appears twice", path=f.path, tensor=name)
                    self._pieces[name][t] = value
        self._metas: dict[str, TensorMeta] = {}
        for name, pieces in self._pieces.items():
            if sorted(pieces) != list(range(lay.tp)):
                raise MissingTensors(f"tensor held by TP ranks {sorted(pieces)} of {lay.tp}", tensor=name,
                                     path=self.iter_dir, fix="the checkpoint is incomplete")
            kind = self.kind(name)
            shapes = {tuple(x.shape) for x in pieces.values()}
            dtypes = {x.dtype for x in pieces.values()}
            if len(shapes) != 1 or len(dtypes) != 1:
                raise LayoutError(f"TP shards disagree: shapes {sorted(shapes)}, dtypes {sorted(map(str, dtypes))}",
                                  tensor=name, path=self.iter_dir, fix="the checkpoint is corrupt or mixed")
            shape = list(shapes.pop())
            dim = {"column": 0, "vocab": 0, "gated": 0, "row": 1}.get(kind)
            if dim is not None and lay.tp > 1:
                shape[dim] *= lay.tp
            self._metas[name] = TensorMeta(name, tuple(shape), dtypes.pop())

    def kind(self, name: str) -> str:
        return tp_kind(name, gated_mlp=bool(getattr(self.args, "swiglu", True)))

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def read(self, name: str) -> torch.Tensor:
        """The full logical tensor, assembled from every TP rank's piece."""
        meta = self._metas[name]
        pieces = self._pieces[name]
        kind = self.kind(name)
        if kind == "replicated" or self.layout.tp == 1:
            return pieces[0].load()
        out = torch.empty(meta.shape, dtype=meta.dtype)
        for r, lazy in pieces.items():
            local = lazy.load()
            ranges = tp_pieces(kind, meta.shape, self.layout.tp, r, name)
            dim = ranges[0][0]
            parts = torch.split(local, [b - a for _, a, b in ranges], dim=dim)
            for (d, a, b), part in zip(ranges, parts):
                out.narrow(d, a, b - a).copy_(part)
            del local, parts
        return out

    def _boxes(self, name: str, dim: int, start: int, stop: int):
        """For the slice ``start:stop`` along ``dim`` of ``name``: (rank's LazyTensor, box offsets and
        sizes in that rank's local tensor, (dim, start, length) of where it lands in the slice); an
        empty slice has none."""
        meta = self._metas[name]
        if not 0 <= start <= stop <= meta.shape[dim]:
            raise IndexError(f"slice {start}:{stop} of dim {dim} out of range for {meta.shape}")
        kind = self.kind(name)
        ranks = [0] if kind == "replicated" or self.layout.tp == 1 else sorted(self._pieces[name])
        for r in ranks:
            lazy = self._pieces[name][r]
            ranges = tp_pieces(kind, meta.shape, self.layout.tp, r, name) if len(ranks) > 1 else [(dim, 0, meta.shape[dim])]
            at = 0                     # where this range starts in the rank's local tensor
            for d, a, b in ranges:
                lo, hi = (max(a, start), min(b, stop)) if d == dim else (a, b)
                if lo < hi:
                    offsets, sizes = [0] * len(meta.shape), list(lazy.shape)
                    offsets[d], sizes[d] = at + lo - a, hi - lo
                    if d != dim:
                        offsets[dim], sizes[dim] = start, stop - start
                    yield lazy, tuple(offsets), tuple(sizes), (d, lo - (start if d == dim else 0), hi - lo)
                at += b - a

    def read_slice(self, name: str, dim: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``read(name)`` narrowed to ``start:stop`` along ``dim``, reading from each TP rank's file
        only the bytes of the slice it holds, into ``out`` (the slice's shape) when given. A slice
        that is a contiguous run of one rank's piece goes straight from the file into ``out``."""
        meta = self._metas[name]
        if not meta.shape:
            return self.read(name) if out is None else out.copy_(self.read(name))
        shape = list(meta.shape)
        shape[dim] = stop - start
        if out is None:
            out = torch.empty(shape, dtype=meta.dtype)
        elif list(out.shape) != shape or out.dtype != meta.dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the slice is {tuple(shape)} {meta.dtype}")
        for lazy, offsets, sizes, (d, at, n) in self._boxes(name, dim, start, stop):
            lazy.load_box(offsets, sizes, out.narrow(d, at, n))
        return out

    def view_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor | None:
        """``read_slice`` as a zero-copy view of one rank's file when the slice is one contiguous
        run of that rank's piece; None otherwise."""
        if not self._metas[name].shape:
            return None
        boxes = list(self._boxes(name, dim, start, stop))
        if len(boxes) != 1 or boxes[0][3] != (dim, 0, stop - start):
            return None
        lazy, offsets, sizes, _ = boxes[0]
        return lazy.view_box(offsets, sizes)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class MegatronTorchWriter(CommitsOnExit):
    """Streams logical tensors into per-rank files: each file's pickle is written up front from
    the plan; `write(name, full)` slices the tensor for every rank that holds part of it."""

    def __init__(self, out_root: Path, layout: MegatronLayout, metas: list[TensorMeta], *, args: Any,
                 iteration: int | str, impl: str, tie_copy: bool, gated_mlp: bool = True,
                 extra: dict | None = None, files: set[tuple[int, int]] | None = None):
        # files: write only these (tp_rank, pp_rank) files (one worker's share); None: all
        self.out_root, self.layout, self.impl = Path(out_root), layout, impl
        self.iteration = iteration
        self.gated_mlp = gated_mlp
        it_value = 0 if iteration == "release" else int(iteration)
        self._routes: dict[str, list[tuple[tuple[int, int], str, str]]] = {}
        per_file: dict[tuple[int, int], list[dict]] = {
            (t, p): [dict() for _ in range(layout.chunks)] for t in range(layout.tp) for p in range(layout.pp)
            if files is None or (t, p) in files}
        for meta in metas:
            targets = [(layout.locate(meta.name), meta.name)]
            if tie_copy and meta.name == "embedding.word_embeddings.weight" and layout.pp > 1:
                targets.append((layout.locate("output_layer.weight"), "output_layer.weight"))
            kind = tp_kind(meta.name, gated_mlp)
            lshape = local_shape(kind, meta.shape, layout.tp)
            for loc, as_name in targets:
                local = to_impl(loc.local_name if as_name == meta.name else as_name, impl)
                for t in (t for t in range(layout.tp) if (t, loc.pp_rank) in per_file):
                    slot = f"{loc.chunk}/{local}"
                    per_file[(t, loc.pp_rank)][loc.chunk][local] = TensorSlot(slot, lshape, meta.dtype)
                    self._routes.setdefault(meta.name, []).append(((t, loc.pp_rank), slot, as_name))
        self._metas = {m.name: m for m in metas}
        self.iter_dir = self.out_root / iteration_dir_name(iteration)
        self._files: dict[tuple[int, int], StreamingTorchSave] = {}
        keys = model_keys(layout.chunks)
        for (t, p), chunks in per_file.items():
            models = {}
            for v, tensors in enumerate(chunks):
                last = p == layout.pp - 1 and v == layout.chunks - 1
                sd = dict(tensors)
                for k in extra_state_keys(list(tensors), impl, has_output_layer=last):
                    sd[k] = None
                models[keys[v]] = dict(sorted(sd.items(), key=lambda kv: _state_order(kv[0])))
            template = {"args": args, "checkpoint_version": 3.0, "iteration": it_value, **models,
                        "ckptconv": extra or {}}
            path = self.iter_dir / rank_dir_name(t, p, layout.pp) / FILE_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[(t, p)] = StreamingTorchSave(path, template)

    def holds(self, name: str) -> bool:
        """Whether any file of this writer takes (part of) ``name``."""
        return name in self._routes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        meta = self._metas[name]
        if tuple(tensor.shape) != meta.shape:
            raise LayoutError(f"shape {tuple(tensor.shape)} != planned {meta.shape}", tensor=name)
        kind = tp_kind(name, self.gated_mlp)
        for (t, p), slot, _ in self._routes.get(name, ()):
            ranges = tp_pieces(kind, meta.shape, self.layout.tp, t, name)
            parts = [tensor.narrow(d, a, b - a) for d, a, b in ranges]
            local = parts[0] if len(parts) == 1 else torch.cat(parts, dim=ranges[0][0])
            self._files[(t, p)].write(slot, local.to(meta.dtype).contiguous())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        (self.out_root / LATEST).write_text(str(self.iteration))

    def abort(self) -> None:
        for f in self._files.values():
            f.abort()


_ORDER = ["embedding.", "decoder.layers.", "decoder.final_layernorm", "output_layer"]


def _state_order(name: str) -> tuple:
    m = re.match(r"^decoder\.layers\.(\d+)\.", name)
    group = next((i for i, p in enumerate(_ORDER) if name.startswith(p)), len(_ORDER))
    return (group, int(m.group(1)) if m else -1, name)
