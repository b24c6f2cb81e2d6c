"""A torch DCP training checkpoint (FSDP2, accelerate, torchtitan) as an HF-named source.

The hub interface of ``ckptconv.sources``: ``config()``, ``tensors()`` (HF name -> TensorMeta),
``read(name)``, ``asset_files()``, ``path``, ``close()``. Bytes come from ``dcp_slices.DcpStore``
(our own reader of the DCP storage layer: no torch.distributed.checkpoint, no pickled code run;
each tensor is assembled from the rank chunks that hold it, one tensor at a time). Where the
model is and under which names is ``dcp_layout``; torchtitan names (and their RoPE order) are
``torchtitan_names``. Optimizer moments, schedulers, RNG and dataloader state are listed
(``other_state``), never read. The config is the checkpoint's config.json (in the directory
given, or in the DCP directory), else ``hf_config``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import CorruptCheckpoint, LayoutError, MissingTensors, UnknownFormat, UnsupportedFamily
from ..types import TensorMeta
from . import torchtitan_names as tt
from .closing import ClosesOnExit
from .dcp_layout import DcpLayout, resolve_layout, split_keys
from .dcp_slices import DcpStore
from .deepspeed_common import find_hf_config
from .hf import ASSET_NAMES

TIED = "lm_head.weight"


def open_layout(path: str | Path, step: str | int | None = None) -> DcpLayout:
    layout = resolve_layout(Path(path), step)
    if layout is None:
        raise UnknownFormat("not a torch.distributed.checkpoint directory (no .metadata, no pytorch_model_fsdp_0/, "
                            "no step-N/)", path=path, fix="point at the directory dcp.save / save_state / "
                            "torchtitan's checkpointer wrote")
    return layout


def check_storage_files(store: DcpStore) -> None:
    """Every data file is as long as the records the metadata places in it (a truncated copy
    fails here, naming the file, before anything is written)."""
    ends: dict[str, int] = {}
    for info in store.metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(ends.items()):
        f = store.directory / rel
        size = f.stat().st_size if f.is_file() else None
        if size is None or size < end:
            what = "is missing" if size is None else f"has {size} bytes, the metadata places records up to byte {end}"
            raise CorruptCheckpoint(f"data file {what} (truncated or incomplete copy)", path=f,
                                    fix="re-copy the checkpoint directory (or re-save it)")


class DcpSource(ClosesOnExit):
    format = "dcp"

    def __init__(self, path: str | Path, step: str | int | None = None, *,
                 hf_config: dict | str | Path | None = None):
        self.layout = open_layout(path, step)
        self.path = self.layout.root
        self._cfg, self._cfg_dir = find_hf_config(self.layout.root, self.layout.model_dir, hf_config)
        self._store = DcpStore(self.layout.model_dir)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        store = self._store
        check_storage_files(store)
        metas = store.tensor_metadata()
        self.keys = split_keys(sorted(metas), store.metadata.planner_data, store.directory / ".metadata")
        self.naming = self.keys.naming
        self.bytes_items = store.bytes_keys()
        tied = bool((self._cfg or {}).get("tie_word_embeddings"))
        self.dropped_aliases = [TIED] if tied and TIED in self.keys.names else []
        self._entries: dict[str, tuple[str, str | None]] = {}     # HF name -> (stored key, op)
        for name, key in self.keys.names.items():
            if name in self.dropped_aliases:
                continue
            hf, op = (name, None) if self.naming == "hf" else (tt.to_hf_name(name) or (None, None))
            if hf is None:
                raise UnsupportedFamily("torchtitan parameter with no Hugging Face name in the Llama 3 table",
                                        path=store.directory, tensor=key,
                                        fix="only torchtitan's Llama 3 names are understood")
            if op is not None and self._cfg is not None:     # no config: config() / read() say so
                self._check_rope(op, key, tuple(metas[key].size))
            self._entries[hf] = (key, op)
        self._metas = {n: TensorMeta(n, tuple(metas[k].size), metas[k].properties.dtype)
                       for n, (k, _) in self._entries.items()}

    def _check_rope(self, op: str, key: str, shape: tuple) -> None:
        cfg = self._require_config()
        heads = tt.rope_heads(op, cfg)
        if len(shape) != 2 or shape[0] % (2 * heads):
            raise LayoutError(f"shape {shape} does not split into {heads} heads of even size", path=self._store.directory,
                              tensor=key, fix="pass the --hf-config of the model that was trained")

    def _require_config(self) -> dict:
        if self._cfg is None:
            raise UnsupportedFamily("a DCP checkpoint does not record the model architecture and no config.json "
                                    "was found next to it", path=self.layout.root,
                                    fix="pass --hf-config FILE|DIR (the config.json of the model that was trained)")
        return self._cfg

    # -- the HF-named source interface ----------------------------------------------------
    def config(self) -> dict:
        cfg = dict(self._require_config())
        dtypes = {m.dtype for m in self._metas.values() if m.dtype.is_floating_point}
        if len(dtypes) == 1:
            cfg["dtype"] = str(dtypes.pop()).replace("torch.", "")
            cfg.pop("torch_dtype", None)
        return cfg

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries.get(name)
        if entry is None:
            raise MissingTensors("no such tensor in the DCP checkpoint", path=self._store.directory, tensor=name,
                                 fix="check the names with `ckptconv inspect --tensors`")
        key, op = entry
        t = self._store.read(key)
        return t if op is None else tt.apply(op, t, self._require_config(), to_hf=True)

    def asset_files(self) -> list[Path]:
        d = self._cfg_dir
        return [d / n for n in ASSET_NAMES if (d / n).is_file()] if d else []

    def state_items(self) -> dict:
        """The training state next to the model, by group: tensors (count, bytes) and pickled
        items (names only: they are never unpickled)."""
        metas = self._store.tensor_metadata()
        out: dict[str, dict] = {}
        for group, keys in sorted(self.keys.other.items()):
            sizes = [metas[k].properties.dtype.itemsize * math.prod(metas[k].size) for k in keys]
            out[group] = {"tensors": len(keys), "bytes": sum(sizes)}
        for key in self.bytes_items:
            out.setdefault(key.split(".", 1)[0], {"tensors": 0, "bytes": 0}).setdefault("pickled", []).append(key)
        return out

    def summary(self) -> dict:
        return {"dcp_layout": self.layout.kind, "naming": self.naming, "wrapper": self.keys.wrapper,
                "model_dir": str(self.layout.model_dir), "step": self.layout.step,
                "dropped_aliases": self.dropped_aliases,
                "skipped_state": {g: len(v) for g, v in sorted(self.keys.other.items())},
                "bytes_items": len(self.bytes_items)}

    def close(self) -> None:
        self._store.close()
