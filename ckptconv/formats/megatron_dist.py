"""Megatron-Core distributed checkpoints (`--ckpt-format torch_dist`): Reader.

    ROOT/latest_checkpointed_iteration.txt   "release" or N (optional: ROOT may be ITER_DIR)
    ROOT/release/ | ROOT/iter_%07d/  (ITER_DIR)
        metadata.json    {"sharded_backend": "torch_dist", ...}
        common.pt        torch.save of the non-sharded state: args, checkpoint_version, iteration, ...
                         (megatron-core <= 0.16; 0.19 keeps it as the BYTES item common_state/shard_0_1
                         instead: `megatron_dist_layout` has the layouts, found from the files)
        .metadata        torch.distributed.checkpoint Metadata: global shapes, chunks, storage
        __R_K.distcp     data records
        integrity.json   optional sha256 manifest (0.19 `verify_integrity`): checked before the
                         first tensor is read; a mismatch is a CorruptCheckpoint naming the file

Stored keys are global and independent of TP/PP: `decoder.layers.<module>.<param>` has a
leading axis over all layers, fc1 is `[gate_full; up_full]`, embeddings are padded-vocab rows.
The reader exposes Megatron *logical* tensors (see `formats/megatron.py`): per global layer
`decoder.layers.{i}.<module>.<param>` (a slice of the stacked tensor, read without reading the
other layers), TE names, TP=1 layout. Optimizer, RNG and scheduler state are never read as
model tensors; they are listed in `common` / `other_state`.
"""
from __future__ import annotations

import argparse
import itertools
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from ..errors import CorruptCheckpoint, LayoutError, MissingTensors, UnknownFormat
from ..plan.experts import EXPERT_RE
from ..plan.megatron_layout import LAYER_RE, MegatronLayout
from ..types import TensorMeta
from .dcp_slices import DcpStore
from .megatron_args import layout_from_args
from .megatron_dist_detect import METADATA_JSON, dist_backend  # noqa: F401 (METADATA_JSON re-exported)
from .megatron_dist_integrity import check_manifest, read_manifest, share_of_files
from .megatron_dist_layout import BACKEND, COMMON_FILE, COMMON_GROUP, COMMON_ITEM, INTEGRITY_FILE, layout_of
from .megatron_names import to_canonical
from .megatron_torch import check_expert_set, resolve_iteration_dir
from .safe_pickle import TorchFile
from .closing import ClosesOnExit

SHARD = re.compile(r"^(?P<key>[^/]+)/shard_(?P<offset>[\d.]+)_(?P<shape>[\d.]+)$")
# A decoder key is stacked over layers (`decoder.layers.<module>`, leading layer axis) or, in models
# with dense and MoE layers mixed, per layer (`decoder.layers.{i}.<module>`). Experts are
# `mlp.experts.experts.<param>` with a GLOBAL expert axis next (after the layer axis if any), or one
# key per expert (`mlp.experts.experts.{g}.<param>`, singleton_local_shards=True).
DECODER = re.compile(r"^decoder\.layers\.(?:(?P<layer>\d+)\.)?(?P<rest>.+)$")
EXPERTS = re.compile(r"^mlp\.experts\.experts\.(?:(?P<g>\d+)\.)?(?P<rest>.+)$")


def leading_axes(key: str) -> tuple[str, ...]:
    """The axes a stored key has before its logical tensor's: ("layer",), ("layer", "expert"), ("expert",)."""
    m = DECODER.match(key)
    if m is None:
        return ()
    e = EXPERTS.match(m.group("rest"))
    return (("layer",) if m.group("layer") is None else ()) + (("expert",) if e and e.group("g") is None else ())


def logical_name(key: str, index: tuple[int, ...] = ()) -> str:
    """The logical name (global layer, global expert) of the entry at ``index`` of the leading axes of ``key``."""
    m = DECODER.match(key)
    if m is None:
        return key
    idx = list(index)
    layer = int(m.group("layer")) if m.group("layer") is not None else idx.pop(0)
    e = EXPERTS.match(m.group("rest"))
    if e is None:
        return to_canonical(f"decoder.layers.{layer}.{m.group('rest')}")
    g = int(e.group("g")) if e.group("g") is not None else idx.pop(0)
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{g}.{e.group('rest')}"


def stacked_key(name: str, per_layer: bool = False) -> tuple[str, tuple[int, ...]] | None:
    """Inverse of ``logical_name``: a logical per-layer name -> (stored key, index on its leading
    axes); ``per_layer``: the per-layer keys of models mixing dense and MoE layers. None for
    tensors outside the decoder layers."""
    m = LAYER_RE.match(name)
    if m is None:
        return None
    layer = int(m.group(1))
    stem = f"decoder.layers.{layer}." if per_layer else "decoder.layers."
    lead = () if per_layer else (layer,)
    e = EXPERT_RE.match(name)
    if e:
        return f"{stem}mlp.experts.experts{e.group('tail')}", (*lead, int(e.group("e")))
    return f"{stem}{m.group(2)}", lead

# top-level groups of Megatron-LM training state; never model weights
TRAINING_STATE = ("optimizer", "rng_state", "opt_param_scheduler", "rerun_state_machine")


def resolve_dist_iteration_dir(root: Path, iteration: str | int = "latest") -> Path:
    return resolve_iteration_dir(root, iteration, is_iter_dir=lambda p: p.is_dir() and bool(dist_backend(p)),
                                 holds=METADATA_JSON)


class MegatronDistReader(ClosesOnExit):
    """Lazily reads a torch_dist checkpoint: metadata and common.pt at open time, bytes on read."""

    format = "megatron_torch_dist"

    def __init__(self, root: Path, iteration: str | int = "latest", *,
                 opener: Callable[[Path], BinaryIO] | None = None):
        self.root = Path(root)
        self.iter_dir = resolve_dist_iteration_dir(self.root, iteration)
        backend = dist_backend(self.iter_dir)
        if backend != BACKEND:
            raise UnknownFormat(f"distributed checkpoint backend {backend!r} is not supported (only {BACKEND!r})",
                                path=self.iter_dir / METADATA_JSON,
                                fix="re-save with --ckpt-format torch_dist (Megatron-LM can convert with "
                                    "--ckpt-convert-format)")
        self._common_file: TorchFile | None = None
        self._store: DcpStore | None = None
        try:
            self._open(opener)
        except BaseException:
            self.close()
            raise

    def _open(self, opener) -> None:
        self._store = DcpStore(self.iter_dir, opener=opener)
        self.integrity = read_manifest(self.iter_dir)   # {file: sha256} or None; checked on first read
        self._unverified = self.integrity is not None
        self._background: Future | None = None
        common_path = self.iter_dir / COMMON_FILE
        self.dist_layout = layout_of(common_path.is_file(), COMMON_ITEM in self._store.bytes_keys())
        if self.dist_layout is None:
            raise MissingTensors(f"no common state: neither {COMMON_FILE} (megatron-core <= 0.16) nor the "
                                 f"{COMMON_ITEM} item (0.19)", path=common_path,
                                 fix="copy the complete checkpoint directory")
        common = self._read_common(common_path)
        self.args = common.get("args")
        self.meta: dict = common.get("ckptconv") or {}
        self.iteration = common.get("iteration")
        self.impl = "transformer_engine"     # distributed checkpoints always use the TE key space
        self._catalog()
        if self.args is None:
            raise CorruptCheckpoint(f"no 'args' in the common state ({self._common_where})", path=self.iter_dir,
                                    fix="checkpoints without Megatron-LM args are not supported")
        self.layout: MegatronLayout = layout_from_args(self.args)
        self.layout.check()
        if self._num_layers is not None and self._num_layers != self.layout.num_layers:
            raise LayoutError(f"stacked layer tensors hold {self._num_layers} layers, args.num_layers is "
                              f"{self.layout.num_layers}", path=self.iter_dir, fix="the checkpoint is inconsistent")
        self._check_experts()
        # common.pt plus one entry per group of sharded training state it does not already hold
        self.common: dict[str, Any] = dict(common)
        for group, keys in self.sharded_state.items():
            self.common.setdefault(group, argparse.Namespace(sharded_keys=keys))

    def _read_common(self, common_path: Path) -> dict:
        """The common dict, from common.pt when present (megatron-core 0.19 prefers it too), else
        from the common_state item (`torch.save([dict])`); both through the safe unpickler."""
        if self.dist_layout.common_file:
            self._common_where = COMMON_FILE
            self._common_file = TorchFile(common_path)
            common = self._common_file.obj
        else:
            self._common_where = f"item {COMMON_ITEM}"
            obj = self._store.read_object(COMMON_ITEM)
            common = obj[0] if isinstance(obj, list) and len(obj) == 1 else obj
        if not isinstance(common, dict):
            raise CorruptCheckpoint(f"the common state ({self._common_where}) holds a {type(common).__name__}, "
                                    "not a dict", path=self.iter_dir, fix="the checkpoint is not a Megatron one")
        return common

    def verify_integrity(self) -> None:
        """Re-hash the files listed in integrity.json (once); CorruptCheckpoint naming a changed file.
        After ``check_integrity_in_background``: wait for that check and raise what it found."""
        if self._background is not None:
            pending, self._background = self._background, None
            pending.result()
            self._unverified = False
        if self._unverified:
            check_manifest(self.iter_dir, self.integrity)
            self._unverified = False

    def check_integrity_in_background(self, part: tuple[int, int] | None = None) -> None:
        """Start the integrity check on a thread, so reads need not wait for a whole extra pass
        over the files; a caller that writes output from the reads must call ``verify_integrity()``
        before it commits that output (a changed file then fails the conversion, nothing is kept).
        ``part=(rank, world)``: one of ``world`` workers whose output is committed only if all of
        them succeed: this one checks its share of the files (``share_of_files``)."""
        if self._unverified and self._background is None:
            files = self.integrity if part is None else share_of_files(self.iter_dir, self.integrity, *part)
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptconv-integrity")
            self._background = pool.submit(check_manifest, self.iter_dir, files)
            pool.shutdown(wait=False)

    def _before_read(self) -> None:
        if self._unverified and self._background is None:
            self.verify_integrity()

    def layout_report(self) -> dict:
        """What `inspect` says about the files: the layout found and the optional parts."""
        return {"dist_layout": self.dist_layout.name, "loads_in": self.dist_layout.loads_in,
                "common_state": self._common_where,
                "integrity_manifest": None if self.integrity is None else
                f"{INTEGRITY_FILE}: {len(self.integrity)} files (sha256, checked before tensors are read)",
                "extra_state": bool(self.extra_state),
                "data_files": sorted({i.relative_path for i in self._store.metadata.storage_data.values()})}

    def _catalog(self) -> None:
        self._where: dict[str, tuple[str, tuple[int, ...]]] = {}   # logical name -> (stored key, leading index)
        self._expert_axes: dict[str, int] = {}                     # stored key -> size of its expert axis
        self._expert_forms: dict[str, str] = {}                    # "axis" | "per_expert" -> a stored key
        self._metas: dict[str, TensorMeta] = {}
        self.extra_state: list[str] = []
        self._extra_keys: dict[str, str] = {}      # logical `_extra_state` name -> stored key
        self.sharded_state: dict[str, list[str]] = {}
        self._num_layers: int | None = None
        for key, md in sorted(self._store.tensor_metadata().items()):
            group = re.split(r"[./]", key, maxsplit=1)[0]
            if group in TRAINING_STATE:
                self.sharded_state.setdefault(group, []).append(key)
                continue
            shape, dtype = tuple(md.size), md.properties.dtype
            axes = leading_axes(key)
            if len(shape) < len(axes):
                raise CorruptCheckpoint(f"stored tensor lacks its {'/'.join(axes)} axis", path=self.iter_dir,
                                        tensor=key, fix="the checkpoint is corrupt")
            if axes[:1] == ("layer",):
                if self._num_layers not in (None, shape[0]):
                    raise LayoutError(f"stacked tensors disagree on the number of layers ({self._num_layers} vs "
                                      f"{shape[0]})", path=self.iter_dir, tensor=key, fix="the checkpoint is corrupt")
                self._num_layers = shape[0]
            if EXPERTS.match(DECODER.match(key).group("rest") if DECODER.match(key) else ""):
                self._expert_forms.setdefault("axis" if "expert" in axes else "per_expert", key)
            if "expert" in axes:
                self._expert_axes[key] = shape[axes.index("expert")]
            for index in itertools.product(*map(range, shape[:len(axes)])):
                self._add(logical_name(key, index), key, index, shape[len(axes):], dtype)
        for key in sorted(self._store.bytes_keys()):
            group = re.split(r"[./]", key, maxsplit=1)[0]
            if group == COMMON_GROUP:
                continue                      # the common state itself (read into self.common)
            m = SHARD.match(key)
            if group not in TRAINING_STATE and m and m.group("key").endswith("._extra_state"):
                base = m.group("key")
                offset = tuple(int(x) for x in m.group("offset").split("."))
                name = logical_name(base, offset[:len(leading_axes(base))])
                self.extra_state.append(name)
                self._extra_keys.setdefault(name, key)
            else:
                self.sharded_state.setdefault(group, []).append(key)

    def _add(self, name: str, key: str, lead: tuple[int, ...], shape: tuple, dtype: torch.dtype) -> None:
        if name in self._metas:
            raise LayoutError("tensor appears twice", path=self.iter_dir, tensor=name,
                              fix="the checkpoint is corrupt")
        self._where[name] = (key, lead)
        self._metas[name] = TensorMeta(name, tuple(shape), dtype)

    def _check_experts(self) -> None:
        """Expert keys agree with args.num_experts, in one layout, with every expert present."""
        lay = self.layout
        if len(self._expert_forms) > 1:
            raise LayoutError("mixed expert layouts: keys with a global expert axis next to per-expert keys",
                              path=self.iter_dir, tensor=self._expert_forms["per_expert"],
                              fix="do not mix checkpoints saved with different singleton_local_shards settings")
        if self._expert_forms and not lay.num_experts:
            raise LayoutError("expert tensors in a checkpoint whose args have no num_experts", path=self.iter_dir,
                              tensor=next(iter(self._expert_forms.values())),
                              fix="the checkpoint's args are inconsistent: set num_experts")
        for key, n in self._expert_axes.items():
            if n != lay.num_experts:
                raise LayoutError(f"the expert axis holds {n} experts, args.num_experts is {lay.num_experts}",
                                  path=self.iter_dir, tensor=key, fix="the checkpoint's args are inconsistent")
        check_expert_set(lay, self._metas, lambda name: self.iter_dir)

    def tensors(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def read(self, name: str) -> torch.Tensor:
        """The full logical tensor (one layer of a stacked tensor: only that layer's bytes)."""
        return self.read_slice(name)

    def read_slice(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """``read(name)`` narrowed to ``start:stop`` along ``dim``, reading only the chunks (and
        within a chunk only the rows) that hold it; into ``out`` (the slice's shape) when given."""
        meta = self._metas.get(name)
        if meta is None:
            raise MissingTensors("no such tensor in the checkpoint", path=self.iter_dir, tensor=name,
                                 fix="run `ckptconv inspect --tensors` to list the tensors")
        self._before_read()
        key, lead = self._where[name]
        sizes = list(meta.shape)
        offsets = [0] * len(sizes)
        if dim is not None:
            stop = sizes[dim] if stop is None else stop
            if not 0 <= start <= stop <= sizes[dim]:
                raise IndexError(f"slice {start}:{stop} of dim {dim} out of range for {meta.shape}")
            offsets[dim], sizes[dim] = start, stop - start
        if not lead:
            return self._store.read(key, offsets, sizes, out=out)
        ones = [1] * len(lead)
        got = self._store.read(key, [*lead, *offsets], [*ones, *sizes],
                               out=None if out is None else out.view(*ones, *out.shape))
        return got.view(got.shape[len(lead):])

    def view_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor | None:
        """``read_slice`` as a zero-copy view of the file when the slice is one contiguous run of
        one stored chunk; None otherwise."""
        meta = self._metas.get(name)
        if meta is None or not meta.shape or not 0 <= start <= stop <= meta.shape[dim]:
            return None
        self._before_read()
        key, lead = self._where[name]
        offsets, sizes = [0] * len(meta.shape), list(meta.shape)
        offsets[dim], sizes[dim] = start, stop - start
        if not lead:
            return self._store.view(key, tuple(offsets), tuple(sizes))
        v = self._store.view(key, (*lead, *offsets), (*[1] * len(lead), *sizes))
        return None if v is None else v.view(v.shape[len(lead):])

    def extra_state_objects(self) -> dict[str, dict[None, Any]]:
        """`_extra_state` entries: logical key -> {None: the stored object} (one per module,
        Megatron's TP-replicated ShardedObject; None: for every TP rank)."""
        out: dict[str, dict[None, Any]] = {}
        for name, key in self._extra_keys.items():
            obj = self._store.read_object(key)
            out[name] = {None: obj[0] if isinstance(obj, list) and len(obj) == 1 else obj}
        return out

    def read_extra_state(self, name: str) -> Any:
        """The object stored for an `_extra_state` entry (Megatron saves `[obj]`); None if unreadable."""
        self._before_read()
        key = self._extra_keys.get(name)
        if key is not None:
            obj = self._store.read_object(key)
            return obj[0] if isinstance(obj, list) and len(obj) == 1 else obj
        raise MissingTensors("no such _extra_state entry", path=self.iter_dir, tensor=name,
                             fix="run `ckptconv inspect` to list the entries")

    def close(self) -> None:
        if getattr(self, "_background", None) is not None:
            self._background.exception()      # let the check finish before the files are closed
            self._background = None
        if self._store is not None:
            self._store.close()
        if self._common_file is not None:
            self._common_file.close()

