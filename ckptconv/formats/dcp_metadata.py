"""Read a `torch.distributed.checkpoint` `.metadata` file without running pickled code.

torch's own `FileSystemReader.read_metadata` calls `pickle.load`, which would execute any
global a crafted file names. The file only ever holds torch's DCP metadata dataclasses, so we
unpickle it with an allowlist: those dataclasses and DCP's save-plan dataclasses (plain data,
which Megatron stores there too), `torch.Size`, dtypes, layouts,
memory formats and paths (kept as strings). Anything else raises `UnsafeCheckpoint`.

Also checks what the storage layer will trust later: every tensor chunk has a storage entry,
entries name a plain file next to `.metadata` (no path components), offsets are non-negative.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import planner as dcp_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix

from ..errors import CorruptCheckpoint, UnsafeCheckpoint
from .safe_pickle_policy import _ints

METADATA_FILE = ".metadata"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class _LegacyMCoreMetadata(dcp_md.Metadata):
    """Stand-in for megatron's `MCoreMetadata` (v0.15 checkpoints with optimizer state)."""


def _size(*args: Any) -> torch.Size:
    if len(args) > 1:
        raise ValueError("torch.Size takes one sequence")
    return torch.Size(_ints(args[0] if args else (), "Size"))


def _layout(name: Any) -> torch.layout:
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise ValueError(f"unknown layout {name!r:.40}")
    return value


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise ValueError("path parts must be strings")
    return "/".join(parts)


_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(_MD, n): getattr(dcp_md, n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")},
    # megatron keeps its save plans in the metadata (`all_local_plans`, for cached re-saves)
    **{("torch.distributed.checkpoint.planner", n): getattr(dcp_plan, n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"): _StoragePrefix,
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): _LegacyMCoreMetadata,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _layout,
    **{("pathlib", n): _path for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    ("collections", "OrderedDict"): dict,
    **{("builtins", t.__name__): t for t in (set, frozenset, list, dict, tuple)},
}
for _n in dir(torch):
    _v = getattr(torch, _n)
    if isinstance(_v, (torch.dtype, torch.layout, torch.memory_format)):
        _ALLOWED[("torch", _n)] = _v
        _ALLOWED[("torch._utils", f"torch.{_n}")] = _v


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: Path):
        super().__init__(fh)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpoint(f"DCP metadata references '{module}.{name}', which is not a "
                                   "torch.distributed.checkpoint metadata class", path=self._path,
                                   fix="load only checkpoints from trusted sources") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint("DCP metadata holds a persistent reference", path=self._path,
                               fix="the file is not a torch.distributed.checkpoint .metadata")


def load_metadata(directory: Path) -> dcp_md.Metadata:
    """The checked DCP Metadata of the checkpoint in ``directory``."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CorruptCheckpoint(f"no {METADATA_FILE} (torch.distributed.checkpoint metadata)", path=path,
                                fix="the save did not finish; copy the complete checkpoint directory")
    try:
        with open(path, "rb") as fh:
            md = _MetadataUnpickler(fh, path).load()
    except (UnsafeCheckpoint, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - any other failure means a malformed file
        raise CorruptCheckpoint(f"cannot unpickle ({type(e).__name__}: {e})"[:300], path=path,
                                fix="re-copy the file") from None
    _check(md, path)
    return md


def _check(md: Any, path: Path) -> None:
    if not isinstance(md, dcp_md.Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CorruptCheckpoint("not a torch.distributed.checkpoint Metadata object", path=path,
                                fix="re-copy the file")
    for key, info in md.storage_data.items():
        if not isinstance(key, dcp_md.MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CorruptCheckpoint("malformed storage_data entry", path=path, tensor=str(key)[:80],
                                    fix="re-copy the file")
        if not isinstance(info.relative_path, str) or not _FILE_NAME.match(info.relative_path) \
                or info.relative_path in (".", "..") or type(info.offset) is not int \
                or type(info.length) is not int or info.offset < 0 or info.length < 0:
            raise CorruptCheckpoint(f"storage entry points at {info.relative_path!r:.80} "
                                    f"offset {info.offset!r:.20} length {info.length!r:.20}", path=path,
                                    tensor=key.fqn, fix="the metadata is corrupt or was tampered with")
        if info.transform_descriptors:
            raise CorruptCheckpoint(f"storage transforms {info.transform_descriptors} are not supported",
                                    path=path, tensor=key.fqn, fix="re-save without DCP stream extensions")
    for fqn, tmd in md.state_dict_metadata.items():
        if isinstance(tmd, dcp_md.BytesStorageMetadata):
            if dcp_md.MetadataIndex(fqn) not in md.storage_data:
                raise CorruptCheckpoint("bytes item has no storage entry", path=path, tensor=fqn,
                                        fix="copy the complete checkpoint directory")
            continue
        if not isinstance(tmd, dcp_md.TensorStorageMetadata):
            raise CorruptCheckpoint(f"unknown metadata type {type(tmd).__name__}", path=path, tensor=fqn,
                                    fix="re-copy the file")
        for c in tmd.chunks:
            if len(c.offsets) != len(tmd.size) or len(c.sizes) != len(tmd.size) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, tmd.size)):
                raise CorruptCheckpoint(f"chunk {tuple(c.offsets)}+{tuple(c.sizes)} lies outside the "
                                        f"global shape {tuple(tmd.size)}", path=path, tensor=fqn,
                                        fix="the metadata is corrupt")
            if dcp_md.MetadataIndex(fqn, c.offsets) not in md.storage_data:
                raise CorruptCheckpoint(f"chunk at {tuple(c.offsets)} has no storage entry", path=path,
                                        tensor=fqn, fix="copy the complete checkpoint directory")
