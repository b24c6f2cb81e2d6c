"""Megatron-LM per-rank `torch` checkpoints: names, layout rules and the Reader (the streaming
Writer is in ``megatron_torch_write``).

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

from ..errors import CorruptCheckpoint, LayoutError, MissingTensors, UnsupportedFamily
from ..plan.experts import missing_experts
from ..plan.megatron_layout import MegatronLayout, tp_kind, tp_pieces
from ..types import TensorMeta
from .megatron_args import gated_mlp, layout_from_args
from .megatron_names import expert_form, is_extra_state, to_canonical
from .safe_pickle import TorchFile
from .closing import ClosesOnExit

FILE_NAME = "model_optim_rng.pt"
LATEST = "latest_checkpointed_iteration.txt"
RANK_DIR = re.compile(r"^mp_rank_(\d{2})((?:_\d{3}){0,2})$")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron-LM's get_checkpoint_name: mp_rank_TT, then _PPP if PP > 1, then _EEE if EP > 1."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return name + (f"_{ep_rank:03d}" if ep > 1 else "")


def parse_rank_dir(path: Path, pp: int, ep: int) -> tuple[int, int, int] | None:
    """(tp_rank, pp_rank, ep_rank) of a rank directory, read with PP and EP from args: the name
    alone cannot tell `mp_rank_00_001` (EP rank 1 at PP 1) from PP rank 1 (at EP 1)."""
    m = RANK_DIR.match(path.name)
    if not m:
        return None
    suffixes = [int(x) for x in m.group(2).split("_") if x]
    want = (pp > 1) + (ep > 1)
    if len(suffixes) != want:
        raise LayoutError(f"rank directory {path.name} has {len(suffixes)} rank suffix(es), args say PP={pp} EP={ep} "
                          f"({rank_dir_name(0, 0, pp, 0, ep)}...)", path=path,
                          fix="do not mix rank directories of different layouts; check pipeline_model_parallel_size "
                              "and expert_model_parallel_size in args")
    p = suffixes.pop(0) if pp > 1 else 0
    e = suffixes.pop(0) if ep > 1 else 0
    return int(m.group(1)), p, e


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


def check_expert_set(layout: MegatronLayout, names, where: Callable[[str], Path]) -> None:
    """Every expert of every MoE layer is present (``where(name)``: the file that should hold it)."""
    if not layout.num_experts:
        return
    missing = missing_experts(names, layout.num_experts)
    if missing:
        raise MissingTensors(f"{len(missing)} expert tensor(s) of {layout.num_experts} experts are absent",
                             path=where(missing[0]), tensor=missing[0],
                             fix="the checkpoint is incomplete: copy the complete rank directories of every EP rank")


class MegatronTorchReader(ClosesOnExit):
    """Lazily reads a per-rank checkpoint: only the pickles are parsed at open time."""

    format = "megatron_torch"

    def __init__(self, root: Path, iteration: str | int = "latest"):
        self.root = Path(root)
        self.iter_dir = resolve_iteration_dir(self.root, iteration)
        self._files: dict[tuple[int, int, int], TorchFile] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        dirs = sorted(d for d in self.iter_dir.iterdir() if RANK_DIR.match(d.name))
        # the first rank's file (mp_rank_00, mp_rank_00_000 or mp_rank_00_000_000) holds the args
        first = next((d / FILE_NAME for d in dirs if set(d.name[8:]) <= {"0", "_"}), None)
        if first is None or not first.is_file():
            raise MissingTensors("rank (tp 0, pp 0, ep 0) is missing", path=self.iter_dir / "mp_rank_00*",
                                 fix="copy the complete checkpoint directory")
        head_file = TorchFile(first)
        self._files[(0, 0, 0)] = head_file
        head = head_file.obj
        if "args" not in head:
            raise CorruptCheckpoint("no 'args' in the rank file", path=first,
                                    fix="checkpoints without args are not supported; re-save with Megatron-LM")
        self.args = head["args"]
        self.layout: MegatronLayout = layout_from_args(self.args)
        lay = self.layout
        lay.check()
        grid = {parse_rank_dir(d, lay.pp, lay.ep): d / FILE_NAME for d in dirs}
        what = f"TP={lay.tp} PP={lay.pp}" + (f" EP={lay.ep} ETP={lay.etp}" if lay.num_experts else "")
        for t, p, e in lay.rank_files():
            path = grid.get((t, p, e))
            want = self.iter_dir / rank_dir_name(t, p, lay.pp, e, lay.ep) / FILE_NAME
            if path is None or not path.is_file():
                raise MissingTensors(f"{what} checkpoint lacks rank (tp {t}, pp {p}" + (f", ep {e})" if lay.ep > 1 else ")"),
                                     path=want, fix="copy the missing mp_rank directory")
            if (t, p, e) not in self._files:
                self._files[(t, p, e)] = TorchFile(path)
        extra = sorted(grid[k].parent.name for k in set(grid) - set(self._files))
        if extra:
            raise LayoutError(f"rank directories {extra} do not fit {what} from args",
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
        self._extra_objects: dict[str, dict[int, Any]] = {}
        self._pieces: dict[str, dict[int, Any]] = {}
        self._replicas: dict[str, list[tuple[Path, int, Any]]] = {}    # copies beyond the one read
        self._piece_files: dict[tuple[str, int], Path] = {}
        self.expert_form: str | None = None       # "sequential" | "grouped" for MoE checkpoints
        keys = model_keys(lay.chunks)
        for (t, p, e), f in sorted(self._files.items()):
            for v, key in enumerate(keys):
                sd = f.obj.get(key)
                if sd is None:
                    raise MissingTensors(f"no '{key}' state dict", path=f.path,
                                         fix="virtual pipeline settings in args do not match the file")
                for local, value in sd.items():
                    if "input_layernorm" in local:
                        self.impl = "local"
                    self._check_expert_form(local, f.path)
                    canonical = to_canonical(local)
                    if is_extra_state(local) or value is None:
                        name = lay.global_name(p, v, canonical, e)
                        if name not in self.extra_state:
                            self.extra_state.append(name)
                        if is_extra_state(local):       # first EP rank's copy of a dense module's state
                            self._extra_objects.setdefault(name, {}).setdefault(t, value)
                        continue
                    if not hasattr(value, "load"):
                        raise CorruptCheckpoint(f"entry is a {type(value).__name__}, not a tensor",
                                                path=f.path, tensor=local, fix="the file is not a model checkpoint")
                    name = lay.global_name(p, v, canonical, e)
                    piece = lay.piece_rank(name, t)
                    held = self._pieces.setdefault(name, {})
                    if piece not in held:      # other files of the same piece hold replicas
                        held[piece] = value
                        self._piece_files[(name, piece)] = f.path
                    elif tuple(held[piece].shape) != tuple(value.shape) or held[piece].dtype != value.dtype:
                        raise LayoutError("replicas of one tensor disagree in shape or dtype", path=f.path,
                                          tensor=name, fix="do not mix rank files from different saves")
                    else:
                        self._replicas.setdefault(name, []).append((f.path, piece, value))
        self._metas: dict[str, TensorMeta] = {}
        check_expert_set(lay, self._pieces, self._file_of)
        for name, pieces in self._pieces.items():
            split = lay.split(name)
            if sorted(pieces) != list(range(split)):
                raise MissingTensors(f"tensor held by {'ETP' if split != lay.tp else 'TP'} ranks {sorted(pieces)} "
                                     f"of {split}", tensor=name, path=self.iter_dir, fix="the checkpoint is incomplete")
            kind = self.kind(name)
            shapes = {tuple(x.shape) for x in pieces.values()}
            dtypes = {x.dtype for x in pieces.values()}
            if len(shapes) != 1 or len(dtypes) != 1:
                raise LayoutError(f"TP shards disagree: shapes {sorted(shapes)}, dtypes {sorted(map(str, dtypes))}",
                                  tensor=name, path=self.iter_dir, fix="the checkpoint is corrupt or mixed")
            shape = list(shapes.pop())
            dim = {"column": 0, "vocab": 0, "gated": 0, "row": 1}.get(kind)
            if dim is not None and lay.split(name) > 1:
                shape[dim] *= lay.split(name)
            self._metas[name] = TensorMeta(name, tuple(shape), dtypes.pop())

    def _file_of(self, name: str) -> Path:
        loc = self.layout.locate(name)
        return self.iter_dir / rank_dir_name(0, loc.pp_rank, self.layout.pp, loc.ep_rank or 0, self.layout.ep) / FILE_NAME

    def _check_expert_form(self, local: str, path: Path) -> None:
        form = expert_form(local)
        if form is None:
            return
        if form == "legacy_grouped":
            raise UnsupportedFamily("legacy GroupedMLP experts (packed weight1/weight2) are not supported",
                                    path=path, tensor=local,
                                    fix="re-save with SequentialMLP or TEGroupedMLP (no --moe-use-legacy-grouped-gemm)")
        if self.expert_form not in (None, form):
            raise LayoutError(f"mixed expert layouts: {form} names next to {self.expert_form} ones", path=path,
                              tensor=local, fix="do not mix rank files saved with and without --moe-grouped-gemm")
        self.expert_form = form

    def kind(self, name: str) -> str:
        return tp_kind(name, gated_mlp=gated_mlp(self.args))

    def extra_state_objects(self) -> dict[str, dict[int, Any]]:
        """`_extra_state` entries: global key (TE names) -> {TP rank: stored object (None,
        LazyTensor, Placeholder...)}."""
        return {k: dict(v) for k, v in self._extra_objects.items()}

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def replica_mismatches(self) -> list[tuple[str, Path]]:
        """(tensor, file) of every replica (a TP-replicated norm or bias, an expert held by several
        TP ranks) whose bytes differ from the copy ``read`` returns. Megatron keeps replicas equal;
        a difference means a corrupt or mixed checkpoint that reading one copy would hide."""
        def raw(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous().reshape(-1).view(torch.uint8)

        def whole(name: str) -> bool:        # read() takes piece 0 of these
            return self.kind(name) == "replicated" or self.layout.split(name) == 1
        checks = [(name, piece, path, lazy) for name, c in self._replicas.items() for path, piece, lazy in c]
        for name, pieces in self._pieces.items():
            if len(pieces) > 1 and whole(name):
                checks += [(name, 0, self._piece_files[(name, r)], lazy) for r, lazy in sorted(pieces.items()) if r]
        return [(name, path) for name, piece, path, lazy in checks
                if not torch.equal(raw(self._pieces[name][piece].load()), raw(lazy.load()))]

    def read(self, name: str) -> torch.Tensor:
        """The full logical tensor, assembled from every TP rank's piece."""
        meta = self._metas[name]
        pieces = self._pieces[name]
        kind = self.kind(name)
        split = self.layout.split(name)
        if kind == "replicated" or split == 1:
            return pieces[0].load()
        out = torch.empty(meta.shape, dtype=meta.dtype)
        for r, lazy in pieces.items():
            local = lazy.load()
            ranges = tp_pieces(kind, meta.shape, split, r, name)
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
        split = self.layout.split(name)
        ranks = [0] if kind == "replicated" or split == 1 else sorted(self._pieces[name])
        for r in ranks:
            lazy = self._pieces[name][r]
            ranges = tp_pieces(kind, meta.shape, split, r, name) if len(ranks) > 1 else [(dim, 0, meta.shape[dim])]
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
