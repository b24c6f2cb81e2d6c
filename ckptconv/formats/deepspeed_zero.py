"""DeepSpeed ZeRO 1/2/3 (and BF16_Optimizer) checkpoints as an HF-named source.

Weights come from one of two places (``weights=``):
* ``"master"`` (default): the fp32 master weights, reassembled from every data-parallel rank's
  flat optimizer partitions (ckptconv.plan.zero_partitions decides which slice of which rank
  file belongs to which parameter; each piece is read with LazyTensor.load_slice, so memory is
  one parameter at a time). Frozen parameters (no master) come from
  ``frozen_param_fragments``, buffers from ``module``; both are widened to fp32 like
  DeepSpeed's zero_to_fp32 does. This is bit-identical to zero_to_fp32's output.
* ``"module"``: the 16-bit (or fp32) module weights of ``mp_rank_00_model_states.pt``
  (stage 0/1/2). Stage 3 saves none (each rank's module holds empty placeholders); there the
  engine's module weights are its fp32 masters copied into its 16-bit partitions after every
  step (``tensor.copy_``: round to nearest even), so they are the masters rounded to the
  engine's dtype (bf16 / fp16 from ``ds_config``), bit-equal to what DeepSpeed gathers
  (``_zero3_consolidated_16bit_state_dict``); frozen params and buffers keep their stored dtype.
  ``weights_from`` says which of these a source did.
Tied parameters (``shared_params``) are written as a copy of their target, except when the
HF config ties them (``tie_word_embeddings``), where HF checkpoints omit the copy.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, LayoutError, MissingTensors
from ..plan.zero_partitions import Piece, fragment_pieces, zero3_pieces, zero12_pieces
from ..types import TensorMeta
from .deepspeed_common import (OPTIM_STATES, ZERO3_MODEL_STATES, find_hf_config, open_pt, plain,
                               require_dict, require_hf_config, resolve_tag_dir)
from .hf import ASSET_NAMES
from .safe_pickle import LazyTensor
from .closing import ClosesOnExit

WEIGHTS = ("master", "module")


class ZeroOptimFiles:
    """The flat fp32 partitions of one model-parallel rank ``mp``: one file per data-parallel rank."""

    def __init__(self, tag_dir: Path, mp: int = 0, bf16: bool = False):
        found: dict[tuple[str, int], Path] = {}
        for c in tag_dir.iterdir():
            m = OPTIM_STATES.match(c.name)
            if m and int(m.group(3)) == mp:
                found[(m.group(1) or "", int(m.group(2)))] = c
        self.files, self.present = [], bool(found)
        if not found:
            return
        prefixes = {p for p, _ in found}
        prefix = "bf16_" if "bf16_" in prefixes and (bf16 or "" not in prefixes) else ""
        name = f"{prefix}zero_pp_rank_{{}}_mp_rank_{mp:02d}_optim_states.pt"
        self.files.append(open_pt(tag_dir / name.format(0), "optimizer states of data-parallel rank 0"))
        osd = self._osd(self.files[0])
        count = osd.get("partition_count")
        self.world = max(count) if isinstance(count, list) else count
        if not isinstance(self.world, int) or self.world < 1:
            raise CorruptCheckpoint(f"bad partition_count {count!r:.40}", path=self.files[0].path,
                                    fix="the optimizer states file is damaged")
        for r in range(1, self.world):
            self.files.append(open_pt(tag_dir / name.format(r), f"optimizer states of data-parallel rank {r} "
                                      f"(partition_count is {self.world})"))
        stray = sorted(r for p, r in found if p == prefix and r >= self.world)
        if stray:
            raise LayoutError(f"optimizer files for ranks {stray} but partition_count is {self.world}",
                              path=tag_dir / name.format(stray[0]), fix="remove files left from another save")
        if "fp32_flat_groups" in osd:
            self.stage, key, self.optimizer = 3, "fp32_flat_groups", "DeepSpeedZeroOptimizer_Stage3"
        elif "single_partition_of_fp32_groups" in osd:
            self.stage, key = plain(osd.get("zero_stage")), "single_partition_of_fp32_groups"
            self.optimizer = "DeepSpeedZeroOptimizer" if self.stage is not None else "BF16_Optimizer"
        else:
            raise CorruptCheckpoint(f"no flat fp32 partitions in the optimizer state (keys {sorted(osd)[:8]})",
                                    path=self.files[0].path,
                                    fix="only ZeRO 1/2/3 and BF16_Optimizer states are supported")
        self.alignment = osd.get("param_alignment_paddings")
        self.flat: list[list[LazyTensor]] = []
        for f in self.files:
            groups = self._osd(f).get(key)
            if not isinstance(groups, list) or not all(isinstance(t, LazyTensor) and len(t.shape) == 1 for t in groups):
                raise CorruptCheckpoint(f"'{key}' is not a list of 1-D tensors", path=f.path,
                                        fix="the optimizer states file is damaged")
            self.flat.append(groups)
        self.dtype = self.flat[0][0].dtype if self.flat[0] else torch.float32

    @staticmethod
    def _osd(f) -> dict:
        osd = require_dict(f, "optimizer_state_dict")["optimizer_state_dict"]
        if not isinstance(osd, dict):
            raise CorruptCheckpoint("optimizer_state_dict is not a dict", path=f.path, fix="the file is damaged")
        return osd

    def pieces(self, param_shapes: list[dict]) -> dict[str, list[Piece]]:
        groups = [[(n, torch.Size(s).numel()) for n, s in g.items()] for g in param_shapes]
        sizes = [[t.shape[0] for t in ranks] for ranks in self.flat]
        try:
            if self.stage == 3:
                if any(s != sizes[0] for s in sizes):
                    raise LayoutError(f"ranks hold different flat group sizes {sizes}",
                                      fix="all optimizer files must come from the same save")
                return zero3_pieces([p for g in groups for p in g], sizes[0], self.world)
            return zero12_pieces(groups, sizes, self.alignment)
        except LayoutError as e:
            raise LayoutError(e.what, path=self.files[0].path, fix=e.fix) from None

    def read(self, pieces: list[Piece], shape: tuple[int, ...]) -> torch.Tensor:
        first = self.flat[pieces[0].rank][pieces[0].group]
        flat = torch.empty(sum(p.stop - p.start for p in pieces), dtype=first.dtype)
        at = 0
        for p in pieces:        # each rank's piece is read straight into its place
            n = p.stop - p.start
            self.flat[p.rank][p.group].load_slice(0, p.start, p.stop, out=flat[at:at + n])
            at += n
        return flat.view(shape)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []


def model_states_files(tag_dir: Path, mp: int = 0) -> tuple[list, bool]:
    """(opened model-states files, is stage 3): one file for stage 0/1/2, one per rank for stage 3."""
    single = tag_dir / f"mp_rank_{mp:02d}_model_states.pt"
    if single.is_file():
        return [open_pt(single, "model states")], False
    first = tag_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
    if not first.is_file():
        present = sorted(c.name for c in tag_dir.iterdir() if ZERO3_MODEL_STATES.match(c.name))
        raise MissingTensors(f"no mp_rank_{mp:02d}_model_states.pt (stage 0-2) nor {first.name} (stage 3)"
                             + (f"; found {present[:3]}" if present else ""), path=tag_dir,
                             fix="copy the complete checkpoint directory")
    files = [open_pt(first, "stage-3 model states of rank 0")]
    world = files[0].obj.get("dp_world_size") if isinstance(files[0].obj, dict) else None
    for r in range(1, int(world or 1)):
        files.append(open_pt(tag_dir / f"zero_pp_rank_{r}_mp_rank_{mp:02d}_model_states.pt",
                             f"stage-3 model states of rank {r} (dp_world_size is {world})"))
    return files, True


class DeepSpeedZeroSource(ClosesOnExit):
    """An HF-named view of a ZeRO checkpoint (see the module docstring). Context manager."""

    format = "deepspeed"

    def __init__(self, path: str | Path, tag: str | None = None, *, weights: str = "master",
                 hf_config: dict | str | Path | None = None):
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}")
        self.root, self.tag_dir, self.tag = resolve_tag_dir(Path(path), tag)
        self.path, self.weights = self.root, weights
        self._cfg, self._cfg_dir = find_hf_config(self.root, self.tag_dir, hf_config)
        self._model_files, self.optim = [], None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        self._model_files, stage3 = model_states_files(self.tag_dir)
        head = require_dict(self._model_files[0], "module", "param_shapes")
        self.head = head
        self.ds_config = head.get("ds_config") or {}
        if int(head.get("mp_world_size") or 1) > 1:
            raise LayoutError(f"model-parallel size {head['mp_world_size']}: this is a tensor-parallel "
                              "(Megatron-DeepSpeed) checkpoint, not a plain ZeRO one", path=self._model_files[0].path,
                              fix="its parameter names must be Megatron's (language_model.*) to be read")
        module = head.get("module") or {}
        self.shared = dict(head.get("shared_params") or {})
        tied = bool((self._cfg or {}).get("tie_word_embeddings"))
        self.dropped_aliases = sorted(a for a, t in self.shared.items() if tied)
        bf16 = bool((self.ds_config.get("bf16") or {}).get("enabled"))
        self.stage = 3 if stage3 else (self.ds_config.get("zero_optimization") or {}).get("stage")
        self._entries: dict[str, tuple] = {}
        # stage 3 saves no module weights: the engine's are its fp32 masters rounded to its dtype
        self.round_to = engine_dtype(self.ds_config) if self.weights == "module" and stage3 else None
        self.weights_from = (f"fp32 masters rounded to {str(self.round_to)[6:]} (stage 3 saves no module weights; "
                             "this is what the engine gathers)" if self.round_to is not None else
                             "fp32 masters" if self.weights == "master" else "saved module weights")
        if self.weights == "module" and not stage3:
            for name, t in module.items():
                if isinstance(t, LazyTensor) and name not in self.dropped_aliases:
                    self._entries[name] = ("lazy", t, t.dtype)
            return
        self.optim = ZeroOptimFiles(self.tag_dir, 0, bf16)
        if not self.optim.present:
            fix = ("stage 3 keeps every weight in the optimizer files: copy them with the checkpoint"
                   if stage3 else "pass --weights module to take the module weights")
            raise MissingTensors("no *_optim_states.pt files: the fp32 master weights are not in this checkpoint",
                                 path=self.tag_dir, fix=fix)
        if (self.optim.stage == 3) != stage3:
            raise LayoutError(f"model states say stage {'3' if stage3 else '0-2'} but the optimizer files are "
                              f"stage {self.optim.stage}", path=self.tag_dir, fix="do not mix files of different saves")
        if stage3 and len(self._model_files) != self.optim.world:
            raise LayoutError(f"{len(self._model_files)} stage-3 model-states files but partition_count is "
                              f"{self.optim.world}", path=self.tag_dir, fix="do not mix files of different saves")
        if self.optim.stage is None and self.stage is None:
            self.stage = 1
        shapes = head["param_shapes"]
        for name, pieces in self.optim.pieces(shapes).items():
            shape = tuple(next(g[name] for g in shapes if name in g))
            self._entries[name] = ("flat", pieces, self.round_to or self.optim.dtype, shape)
        frozen = head.get("frozen_param_shapes") or {}
        for name, shape in frozen.items():
            frags = [(f.obj.get("frozen_param_fragments") or {}).get(name) for f in self._model_files]
            if not all(isinstance(x, LazyTensor) for x in frags):
                raise MissingTensors("frozen parameter has no fragment", path=self._model_files[0].path, tensor=name,
                                     fix="the model states file is incomplete")
            self._entries[name] = ("frozen", frags, self._widen(frags[0].dtype), tuple(shape))
        for name in head.get("buffer_names") or []:
            t = module.get(name)
            if not isinstance(t, LazyTensor):
                raise MissingTensors("buffer listed in buffer_names is absent from module",
                                     path=self._model_files[0].path, tensor=name, fix="the file is incomplete")
            self._entries[name] = ("buffer", t, self._widen(t.dtype))
        for alias, target in self.shared.items():
            if alias not in self.dropped_aliases and target in self._entries:
                self._entries[alias] = ("alias", target, self._entries[target][2])
        stray = [n for n in module if n not in self._entries and n not in self.dropped_aliases]
        if stray:
            raise MissingTensors(f"{len(stray)} module tensor(s) have no master weight, frozen fragment or buffer "
                                 "entry", path=self._model_files[0].path, tensor=stray[0],
                                 fix="the checkpoint is incomplete or from an unsupported DeepSpeed version")
        order = {n: i for i, n in enumerate(module)}
        self._entries = dict(sorted(self._entries.items(), key=lambda kv: order.get(kv[0], len(order))))

    # -- the HF-named source interface ----------------------------------------------------
    def config(self) -> dict:
        cfg = dict(require_hf_config(self._cfg, self.root))
        dtypes = {e[2] for e in self._entries.values() if e[2].is_floating_point}
        if len(dtypes) == 1:
            cfg["dtype"] = str(dtypes.pop()).replace("torch.", "")
            cfg.pop("torch_dtype", None)
        return cfg

    def tensors(self) -> dict[str, TensorMeta]:
        return {n: TensorMeta(n, self._shape(e), e[2]) for n, e in self._entries.items()}

    def read(self, name: str) -> torch.Tensor:
        try:
            e = self._entries[name]
        except KeyError:
            raise MissingTensors("no such tensor in the DeepSpeed checkpoint", path=self.tag_dir, tensor=name,
                                 fix="check the names with `ckptconv inspect --tensors`") from None
        kind = e[0]
        if kind == "alias":
            return self.read(e[1])
        if kind == "flat":      # round to nearest even, as the engine's copy of its masters does
            return self.optim.read(e[1], e[3]).to(e[2])
        if kind == "frozen":
            frags, shape = e[1], e[3]
            numel = torch.Size(shape).numel()
            if len(frags) == 1:      # stage 0-2: the whole tensor
                return frags[0].load().reshape(shape).to(e[2])
            parts = [frags[p.rank].load_slice(0, p.start, p.stop) for p in fragment_pieces(numel, len(frags))]
            return torch.cat(parts).view(shape).to(e[2])
        return e[1].load().to(e[2])

    def _widen(self, dtype: torch.dtype) -> torch.dtype:
        """Master weights: frozen params and buffers widened to fp32 (zero_to_fp32's rule); the
        engine's module weights (stage 3): kept in the dtype the engine holds them in."""
        return dtype if self.round_to is not None else _widen(dtype)

    def _shape(self, e: tuple) -> tuple[int, ...]:
        if e[0] == "alias":
            return self._shape(self._entries[e[1]])
        return tuple(e[3]) if e[0] in ("flat", "frozen") else tuple(e[1].shape)

    def asset_files(self) -> list[Path]:
        d = self._cfg_dir
        return [d / n for n in ASSET_NAMES if (d / n).is_file()] if d else []

    def close(self) -> None:
        for f in self._model_files:
            f.close()
        self._model_files = []
        if self.optim is not None:
            self.optim.close()


def engine_dtype(ds_config: dict) -> torch.dtype:
    """The dtype a DeepSpeed engine computes in: bf16 / fp16 when its config enables them."""
    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def _widen(dtype: torch.dtype) -> torch.dtype:
    """zero_to_fp32 writes every floating tensor (frozen, buffers) as fp32; other dtypes stay."""
    return torch.float32 if dtype.is_floating_point else dtype
