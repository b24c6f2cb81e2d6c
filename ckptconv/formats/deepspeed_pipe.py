"""Megatron-DeepSpeed checkpoints (the fork's GPTModelPipe / GPTModel) as Megatron logical tensors.

Two layouts, both written by DeepSpeed's engine:
  pipeline     TAG/layer_LL[-model_TT]-model_states.pt, one per PipelineModule layer and TP rank
               TT, with the layer's local names (word_embeddings.weight,
               self_attention.query_key_value.weight, ..., `weight` of the final norm,
               lm_head.weight); TAG/mp_rank_MM_model_states.pt (module None; param_shapes with
               `LL.<local>` / `tied_modules.<key>.<local>` names; the fork's `args`), MM = stage*TP+TT.
  no pipeline  TAG/mp_rank_TT_model_states.pt whose `module` is GPTModel's state dict
               (language_model.embedding.word_embeddings.weight, language_model.encoder.layers.N...).
Masters (``weights="master"``) come from each model-parallel rank's ZeRO-1/2 flat partitions
(TAG/[bf16_]zero_pp_rank_R_mp_rank_MM_optim_states.pt, names as in that rank's param_shapes);
when no optimizer files exist and the module weights are fp32, those are the masters.
The reader exposes Megatron-Core names (TE key space, global layers, TP=1 layout) with the
interface of ckptconv.formats.megatron, so MegatronAsHF and the family tables do the rest:
a rename is all the fork's layout needs (see deepspeed_megatron_names).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, LayoutError, MissingTensors
from ..plan.megatron_layout import MegatronLayout, split_dim, tp_kind, tp_pieces
from ..types import TensorMeta
from .deepspeed_common import LAYER_FILE, MODEL_STATES, find_hf_config, open_pt, resolve_tag_dir
from .deepspeed_megatron_names import (EMBEDDING, FINAL_NORM, LM_HEAD, classify_layer, core_args,
                                       flat_core_name, flatten, layer_name, unsupported)
from .deepspeed_zero import ZeroOptimFiles
from .safe_pickle import LazyTensor
from .closing import ClosesOnExit


class MegatronDeepSpeedReader(ClosesOnExit):
    format = "megatron_deepspeed"

    def __init__(self, path: str | Path, tag: str | None = None, *, weights: str = "master",
                 hf_config: dict | str | Path | None = None):
        self.root, self.iter_dir, self.tag = resolve_tag_dir(Path(path), tag)
        self.weights = weights
        cfg, _ = find_hf_config(self.root, self.iter_dir, hf_config if not isinstance(hf_config, dict) else None)
        self.meta: dict = {"hf_config": hf_config if isinstance(hf_config, dict) else cfg}
        self.extra_state: list[str] = []
        self.impl = "transformer_engine"
        self._files: list = []
        self._optim: dict[int, ZeroOptimFiles] = {}
        self._flat_pieces: dict[int, dict] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- discovery ------------------------------------------------------------------------
    def _open(self) -> None:
        mp_files = {int(m.group(1)): c for c in self.iter_dir.iterdir() if (m := MODEL_STATES.match(c.name))}
        self._states: dict[int, dict] = {}
        for mp in sorted(mp_files):
            f = open_pt(mp_files[mp], f"model states of model-parallel rank {mp}")
            self._files.append(f)
            if not isinstance(f.obj, dict):
                raise CorruptCheckpoint("not a DeepSpeed model states file", path=f.path, fix="re-copy the file")
            self._states[mp] = f.obj
        head = self._states.get(0, {})
        raw_args = head.get("args")
        if raw_args is not None and not hasattr(raw_args, "num_layers"):
            raise CorruptCheckpoint("'args' is not a Megatron argument namespace", path=mp_files[0],
                                    fix="pass --hf-config")
        self.raw_args = raw_args
        self.args = core_args(raw_args) if raw_args is not None else None
        self.common = {k: v for k, v in head.items() if k not in ("module",)}
        self.iteration = head.get("iteration", head.get("global_steps"))
        self.checkpoint_version = head.get("checkpoint_version")
        if self.checkpoint_version is not None and float(self.checkpoint_version) < 2.0:
            raise LayoutError(f"checkpoint_version {self.checkpoint_version}: the pre-2.0 QKV layout is not supported",
                              path=mp_files[0], fix="re-save with a Megatron-DeepSpeed release from 2021 or later")
        self._pieces: dict[str, dict[int, object]] = {}
        layer_files = [(int(m.group(1)), int(m.group(2) or 0), c) for c in sorted(self.iter_dir.iterdir())
                       if (m := LAYER_FILE.match(c.name))]
        if layer_files:
            self.pipeline = True
            self._catalog_pipeline(layer_files)
        else:
            self.pipeline = False
            self._catalog_flat()
        self._metas = self._merge_metas()
        self.layout.check()

    def _add(self, name: str, tp_rank: int, source: object, where: Path) -> None:
        slot = self._pieces.setdefault(name, {})
        if tp_rank in slot:
            raise LayoutError("tensor appears twice for the same TP rank", path=where, tensor=name,
                              fix="remove stray files from another save")
        slot[tp_rank] = source

    def _catalog_flat(self) -> None:
        if not self._states:
            raise MissingTensors("no mp_rank_*_model_states.pt files", path=self.iter_dir,
                                 fix="copy the complete checkpoint directory")
        self.tp = len(self._states)
        for t, state in sorted(self._states.items()):
            module = state.get("module")
            if not isinstance(module, dict):
                raise CorruptCheckpoint("model states hold no module state dict", path=self._path(t),
                                        fix="the checkpoint holds no weights")
            for name, value in flatten(module):
                core = flat_core_name(name)
                if core is not None and isinstance(value, LazyTensor):
                    self._add(core, t, (value, t, name), self._path(t))
        layers = {int(n.split(".")[2]) for n in self._pieces if n.startswith("decoder.layers.")}
        self.layout = MegatronLayout(self.tp, 1, len(layers))

    def _catalog_pipeline(self, layer_files: list[tuple[int, int, Path]]) -> None:
        self.tp = max(t for _, t, _ in layer_files) + 1
        by_index: dict[int, dict[int, Path]] = {}
        for idx, t, path in layer_files:
            by_index.setdefault(idx, {})[t] = path
        stage_of = self._stage_of_layer()
        kinds, counts, layer_no = {}, {}, 0
        for idx in sorted(by_index):
            files = by_index[idx]
            if sorted(files) != list(range(self.tp)):
                raise MissingTensors(f"layer {idx} has files for TP ranks {sorted(files)} of {self.tp}",
                                     path=self.iter_dir / f"layer_{idx:02d}-model_XX-model_states.pt",
                                     fix="copy the missing layer files")
            for t, path in sorted(files.items()):
                f = open_pt(path, f"layer {idx} of TP rank {t}")
                self._files.append(f)
                sd = f.obj
                if not isinstance(sd, dict) or not all(isinstance(v, LazyTensor) for v in sd.values()):
                    raise CorruptCheckpoint("layer file is not a state dict of tensors", path=path,
                                            fix="re-copy the file")
                kind = classify_layer(list(sd))
                if kind == "unknown" or kinds.setdefault(idx, kind) != kind:
                    raise LayoutError(f"cannot tell what pipeline layer {idx} is (keys {sorted(sd)[:4]})",
                                      path=path, fix="only Megatron-DeepSpeed GPTModelPipe layers are supported")
                table = {"embedding": EMBEDDING, "final_norm": FINAL_NORM, "lm_head": LM_HEAD}.get(kind)
                for local, value in sd.items():
                    where = f"{path.name}:{local}"
                    if kind == "layer":
                        core = layer_name(layer_no, local, where)
                    elif local in table:
                        core = table[local]
                    else:
                        raise unsupported(local, where)
                    self._add(core, t, (value, t, (idx, local)), path)
            if kinds[idx] == "layer":
                stage = stage_of.get(idx, 0)
                counts[stage] = counts.get(stage, 0) + 1
                layer_no += 1
        layer_idx = [i for i in sorted(kinds) if kinds[i] == "layer"]
        if layer_idx and layer_idx != list(range(layer_idx[0], layer_idx[-1] + 1)):
            missing = sorted(set(range(layer_idx[0], layer_idx[-1] + 1)) - set(layer_idx))
            raise MissingTensors(f"transformer layer files {missing} are missing", path=self.iter_dir,
                                 fix="copy the complete checkpoint directory")
        want = getattr(self.raw_args, "num_layers", None)
        if want is not None and int(want) != layer_no:
            raise MissingTensors(f"{layer_no} transformer layer files but args.num_layers is {want}",
                                 path=self.iter_dir, fix="copy the complete checkpoint directory")
        per_stage = [counts.get(s, 0) for s in range(max(counts, default=0) + 1)]
        pp = len(per_stage)
        even = len(set(per_stage)) == 1
        self.layout = MegatronLayout(self.tp, pp, layer_no, None, None if even or pp == 1 else per_stage[0],
                                     None if even or pp == 1 else per_stage[-1])

    def _stage_of_layer(self) -> dict[int, int]:
        out = {}
        for mp, state in self._states.items():
            for group in state.get("param_shapes") or []:
                for name in group:
                    head = str(name).split(".", 1)[0]
                    if head.isdigit():
                        out.setdefault(int(head), mp // self.tp)
        return out

    def _merge_metas(self) -> dict[str, TensorMeta]:
        metas = {}
        gated = bool(getattr(self.args, "swiglu", True)) if self.args is not None else True
        for name, pieces in self._pieces.items():
            if sorted(pieces) != list(range(self.tp)):
                raise MissingTensors(f"tensor held by TP ranks {sorted(pieces)} of {self.tp}", tensor=name,
                                     path=self.iter_dir, fix="the checkpoint is incomplete")
            shapes = {tuple(p[0].shape) for p in pieces.values()}
            dtypes = {p[0].dtype for p in pieces.values()}
            if len(shapes) != 1 or len(dtypes) != 1:
                raise LayoutError(f"TP shards disagree: shapes {sorted(shapes)}", tensor=name, path=self.iter_dir,
                                  fix="the checkpoint is corrupt or mixed")
            shape = list(shapes.pop())
            dim = split_dim(tp_kind(name, gated))
            if dim is not None and self.tp > 1:
                shape[dim] *= self.tp
            dtype = dtypes.pop()
            if self.weights == "master" and self._master_available():
                dtype = self._optim_for(0).dtype
            metas[name] = TensorMeta(name, tuple(shape), dtype)
        return metas

    # -- masters --------------------------------------------------------------------------
    def _master_available(self) -> bool:
        if self.weights != "master":
            return False
        present = self._optim_for(0).present
        if not present and any(p[0].dtype != torch.float32 for ps in self._pieces.values() for p in ps.values()):
            raise MissingTensors("no *_optim_states.pt files hold fp32 masters and the module weights are 16-bit",
                                 path=self.iter_dir, fix="pass --weights module")
        return present

    def _optim_for(self, mp: int) -> ZeroOptimFiles:
        if mp not in self._optim:
            bf16 = bool(((self._states.get(mp) or {}).get("ds_config") or {}).get("bf16", {}).get("enabled"))
            self._optim[mp] = ZeroOptimFiles(self.iter_dir, mp, bf16)
            if self._optim[mp].present and self._optim[mp].stage == 3:
                raise LayoutError("ZeRO stage 3 with Megatron-DeepSpeed is not supported", path=self.iter_dir,
                                  fix="use --weights module")
        return self._optim[mp]

    def _read_master(self, t: int, key, shape: tuple[int, ...]) -> torch.Tensor:
        for mp in sorted(self._states):
            if mp % self.tp != t and self.pipeline:
                continue
            if not self.pipeline and mp != t:
                continue
            names = {n for g in self._states[mp].get("param_shapes") or [] for n in g}
            if self.pipeline:
                idx, local = key
                tied = re.compile(rf"tied_modules\.[^.]+\.{re.escape(local)}")
                want = [f"{idx}.{local}"] + [n for n in names if tied.fullmatch(n)]
            else:
                want = [key]
            for name in want:
                if name in names:
                    optim = self._optim_for(mp)
                    if mp not in self._flat_pieces:
                        self._flat_pieces[mp] = optim.pieces(self._states[mp]["param_shapes"])
                    return optim.read(self._flat_pieces[mp][name], shape)
        raise MissingTensors("no fp32 master for this tensor in any optimizer file", tensor=str(key),
                             path=self.iter_dir, fix="pass --weights module")

    @property
    def optim(self) -> ZeroOptimFiles | None:
        """Model-parallel rank 0's optimizer files, once opened (master weights)."""
        return self._optim.get(0)

    # -- reader interface -----------------------------------------------------------------
    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def read(self, name: str) -> torch.Tensor:
        meta = self._metas[name]
        kind = tp_kind(name, bool(getattr(self.args, "swiglu", True)) if self.args is not None else True)
        master = self._master_available()
        out = None
        for t, (lazy, _, key) in sorted(self._pieces[name].items()):
            local = self._read_master(t, key, tuple(lazy.shape)) if master else lazy.load()
            if kind == "replicated" or self.tp == 1:
                return local.to(meta.dtype)
            out = torch.empty(meta.shape, dtype=meta.dtype) if out is None else out
            ranges = tp_pieces(kind, meta.shape, self.tp, t, name)
            parts = torch.split(local, [b - a for _, a, b in ranges], dim=ranges[0][0])
            for (d, a, b), part in zip(ranges, parts):
                out.narrow(d, a, b - a).copy_(part)
        return out

    def _path(self, mp: int) -> Path:
        return self.iter_dir / f"mp_rank_{mp:02d}_model_states.pt"

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        for o in self._optim.values():
            o.close()
        self._optim = {}


