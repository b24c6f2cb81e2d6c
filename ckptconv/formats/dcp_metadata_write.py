"""The write plan of a DCP save and the `.metadata` file torch's `FileSystemWriter` would write for it.

A save is a list of `PlanItem`: a chunk of a stored tensor (its offsets and sizes within the
global ``size``) or a BYTES item. Once the records are written (`dcp_records`), `metadata_bytes`
gives the pickle of the torch `Metadata` that `dcp.save` with the default planner writes for the
same items: ``state_dict_metadata`` (one `TensorStorageMetadata` per tensor with its chunks in plan
order, `BytesStorageMetadata` per BYTES item), ``storage_data`` (`MetadataIndex` ->
`_StorageInfo(file, offset, length)`, the index hint being the chunk's position), an empty
`StorageMeta` and ``version`` "1.0.0" (torch 2.13's). It is written with `pickle_emit`, so
torch's DCP package is never imported to write a checkpoint; `pickle.load` in torch (and in
megatron-core) rebuilds torch's own classes from it, and tests compare them with what
`dcp.save` writes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LayoutError
from .pickle_emit import Call, Global, New, dumps

DCP_VERSION = "1.0.0"          # torch.distributed.checkpoint._version (torch 2.13)
_MD = "torch.distributed.checkpoint.metadata"
_SIZE = Global("torch", "Size")
_STRIDED = Call(Global("torch.serialization", "_get_layout"), ("torch.strided",))
_CONTIGUOUS = Call(Global(_MD, "_MEM_FORMAT_ENCODING"), (0,))


@dataclass(frozen=True)
class PlanItem:
    """One record: a chunk (``offsets``, ``sizes``) of the stored tensor ``fqn`` of shape ``size``,
    or, with ``offsets`` None, a BYTES item."""
    fqn: str
    offsets: tuple[int, ...] | None = None
    sizes: tuple[int, ...] = ()
    size: tuple[int, ...] = ()
    dtype: torch.dtype | None = None

    @property
    def is_bytes(self) -> bool:
        return self.offsets is None

    @property
    def key(self) -> tuple[str, tuple[int, ...] | None]:
        return self.fqn, self.offsets


@dataclass(frozen=True)
class Stored:
    """Where a record's bytes are: ``relative_path`` from offset ``offset``, ``length`` bytes."""
    relative_path: str
    offset: int
    length: int


def tensor_item(fqn: str, offsets, sizes, size, dtype: torch.dtype) -> PlanItem:
    return PlanItem(fqn, tuple(map(int, offsets)), tuple(map(int, sizes)), tuple(map(int, size)), dtype)


def _torch_size(dims) -> Call:
    return Call(_SIZE, (tuple(int(d) for d in dims),))


def _dtype(dtype: torch.dtype) -> Global:
    module, _, name = str(dtype).rpartition(".")
    return Global(module, name)


def _index(item: PlanItem, chunk: int | None) -> New:
    offset = None if item.offsets is None else _torch_size(item.offsets)
    return New(Global(_MD, "MetadataIndex"), {"fqn": item.fqn, "offset": offset, "index": chunk})


def metadata_bytes(items: list[PlanItem], stored: dict) -> bytes:
    """The `.metadata` pickle for ``items``, whose records are at ``stored[item.key]``."""
    tensors: dict[str, dict] = {}
    state: dict[str, New] = {}
    storage: dict[New, New] = {}
    for item in items:
        where = stored.get(item.key)
        if where is None:
            raise LayoutError("planned record was not written", tensor=item.fqn,
                              fix="the save stopped early; nothing was kept")
        if item.is_bytes:
            if item.fqn in state:
                raise LayoutError("BYTES item planned twice", tensor=item.fqn)
            state[item.fqn] = New(Global(_MD, "BytesStorageMetadata"))
            chunk = None
        else:
            entry = tensors.get(item.fqn)
            if entry is None:
                entry = tensors[item.fqn] = {"of": (tuple(item.size), item.dtype), "chunks": []}
                state[item.fqn] = New(Global(_MD, "TensorStorageMetadata"), {
                    "properties": _properties(item.dtype), "size": _torch_size(item.size),
                    "chunks": entry["chunks"]})
            elif (tuple(item.size), item.dtype) != entry["of"]:
                raise LayoutError(f"chunk of a {item.size} {item.dtype} tensor in a {entry['of'][0]} "
                                  f"{entry['of'][1]} one", tensor=item.fqn, fix="this is a bug in the caller")
            chunk = len(entry["chunks"])
            entry["chunks"].append(New(Global(_MD, "ChunkStorageMetadata"), {
                "offsets": _torch_size(item.offsets), "sizes": _torch_size(item.sizes)}))
        storage[_index(item, chunk)] = New(Global("torch.distributed.checkpoint.filesystem", "_StorageInfo"), {
            "relative_path": where.relative_path, "offset": where.offset, "length": where.length})
    storage_meta = New(Global(_MD, "StorageMeta"),
                       {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []})
    return dumps(New(Global(_MD, "Metadata"), {
        "state_dict_metadata": state, "planner_data": None, "storage_data": storage,
        "storage_meta": storage_meta, "version": DCP_VERSION}))


def _properties(dtype: torch.dtype) -> New:
    return New(Global(_MD, "TensorProperties"), (_dtype(dtype), _STRIDED, False, _CONTIGUOUS, False))
