"""The two things being compared, each seen tolerantly in a common layout.

Unlike a conversion (which refuses an incomplete checkpoint), verify must *report* a missing or
extra parameter, so these views never require the family table to be complete:

* ``HFSide``: anything ``ckptconv.sources.open_hf_view`` opens (HF, DeepSpeed, ...), in HF names;
  in Megatron layout through the family's forward ops (vocab padded to the peer's padding).
* ``MegatronSide``: any reader in the Megatron READERS registry, in Megatron logical names;
  in HF names through the family's inverse ops.
* ``ManifestSide``: a fingerprint manifest (hashes only, HF names).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..families import family_by_name, family_for_hf
from ..families.schema import Mapping
from ..formats.closing import wrap_or_close
from ..formats.detect import detect_format
from ..formats.megatron import READERS as MEGATRON_READERS
from ..formats.megatron import open_megatron_reader
from ..formats.megatron_args import config_from_args
from ..ops import OpContext, get_op
from ..plan.planner import TIED_COPY
from ..sources import open_hf_view
from ..types import DTYPE_NAMES, TensorMeta
from .manifest import load_manifest

TIED_HF = "lm_head.weight"
EMBED_HF = "model.embed_tokens.weight"
EMBED_MG = "embedding.word_embeddings.weight"


class HFSide:
    kind = "hf"

    def __init__(self, source, label: str):
        self.source, self.label, self.path = source, label, Path(source.path)
        cfg = source.config()
        self.family = family_for_hf(cfg, Path(source.path) / "config.json")
        self.cfg = self.family.from_hf_config(cfg)
        self.layout = None
        self.padded = self.cfg.vocab_size
        self._metas = source.tensors()

    def hf_metas(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def hf_meta(self, name: str) -> TensorMeta:
        return self._metas[name]

    def read_hf(self, names) -> dict[str, torch.Tensor]:
        return {n: self.source.read(n) for n in names if n in self._metas}

    def mg_meta(self, m: Mapping, padded: int) -> TensorMeta | None:
        if not all(n in self._metas for n in m.hf):
            return None
        ins = [self._metas[n] for n in m.hf]
        shape = get_op(m.op).forward_shape([x.shape for x in ins], OpContext(self.cfg, padded))
        return TensorMeta(m.megatron, tuple(shape), ins[0].dtype)

    def read_mg(self, m: Mapping, padded: int) -> torch.Tensor:
        xs = [self.source.read(n) for n in m.hf]
        return get_op(m.op).forward(xs, OpContext(self.cfg, padded))

    def close(self) -> None:
        self.source.close()


class MegatronSide:
    kind = "megatron"

    def __init__(self, reader, label: str, hf_config: dict | None = None):
        self.reader, self.label, self.path = reader, label, Path(reader.root)
        self.cfg = config_from_args(reader.args, hf_config or reader.meta.get("hf_config"), check_fields=False)
        self.family = family_by_name(self.cfg.family)
        self.layout = reader.layout
        self._metas = reader.tensors()
        emb = self._metas.get(EMBED_MG)
        self.padded = int(getattr(reader.args, "padded_vocab_size", 0) or (emb.shape[0] if emb else 0)
                          or self.cfg.vocab_size)
        self.ctx = OpContext(self.cfg, self.padded)

    def mg_metas(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def meta(self, name: str) -> TensorMeta:
        return self._metas[name]

    def read(self, name: str) -> torch.Tensor:
        return self.reader.read(name)

    def hf_mapping_metas(self, m: Mapping) -> dict[str, TensorMeta]:
        """HF metas this mapping yields here ({} if its tensor is absent or does not fit the config)."""
        meta = self._metas.get(m.megatron)
        if meta is None:
            return {}
        op = get_op(m.op)
        try:
            shapes = op.inverse_shapes(meta.shape, self.ctx)
            fits = tuple(op.forward_shape(shapes, self.ctx)) == tuple(meta.shape)
        except (ValueError, IndexError, ZeroDivisionError):
            fits = False
        if not fits:
            return {}
        return {n: TensorMeta(n, tuple(s), meta.dtype) for n, s in zip(m.hf, shapes)}

    def hf_metas(self) -> dict[str, TensorMeta]:
        out: dict[str, TensorMeta] = {}
        for m in self.family.expand(self.cfg):
            out.update(self.hf_mapping_metas(m))
        return out

    def read_hf_group(self, m: Mapping) -> dict[str, torch.Tensor]:
        if not self.hf_mapping_metas(m):
            return {}
        outs = get_op(m.op).inverse(self.reader.read(m.megatron), self.ctx)
        return dict(zip(m.hf, outs))

    def close(self) -> None:
        self.reader.close()


class ManifestSide:
    kind = "manifest"

    def __init__(self, manifest, label: str):
        self.manifest, self.label, self.path = manifest, label, manifest.path
        self.cfg = manifest.config()
        self.layout = None

    def hf_metas(self) -> dict[str, TensorMeta]:
        out = {}
        for n, e in self.manifest.tensors.items():
            dt = DTYPE_NAMES.get(e["dtype"]) or getattr(torch, e["dtype"], None)
            out[n] = TensorMeta(n, tuple(e["shape"]), dt if isinstance(dt, torch.dtype) else torch.uint8)
        return out

    def digest(self, name: str) -> str:
        return self.manifest.tensors[name]["sha256"]

    def close(self) -> None:
        pass


def open_side(path: str | Path, label: str, *, iteration: str | int = "latest", hf_config: dict | None = None):
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return ManifestSide(load_manifest(p), label)
    if p.is_dir():
        fmt = detect_format(p)
        if fmt in MEGATRON_READERS:
            return wrap_or_close(open_megatron_reader(p, fmt, iteration), lambda r: MegatronSide(r, label, hf_config))
    return wrap_or_close(open_hf_view(path, iteration=iteration, hf_config=hf_config), lambda s: HFSide(s, label))


def is_tied_copy(side, name: str) -> bool:
    """A stored copy of a tied embedding (HF lm_head, Megatron's last-stage output_layer)."""
    return bool(side.cfg.tie_embeddings) and name in (TIED_HF, TIED_COPY)


def is_derived_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")
