"""Read a `torch.distributed.checkpoint` `.metadata` file without running pickled code.

torch's own `FileSystemReader.read_metadata` calls `pickle.load`, which would execute any
global a crafted file names. The file only ever holds torch's DCP metadata dataclasses, so we
unpickle it with an allowlist that maps those dataclasses and DCP's save-plan dataclasses
(plain data, which Megatron stores there too) to our stand-ins in `dcp_types`, plus
`torch.Size`, dtypes, layouts, memory formats and paths (kept as strings). Anything else
raises `UnsafeCheckpoint`. Nothing here imports `torch.distributed.checkpoint` (slow to import).

Also checks what the storage layer will trust later: every tensor chunk has a storage entry,
entries name a plain file next to `.metadata` (no path components), offsets are non-negative,
names are strings, shapes and offsets are tuples of ints, dtypes are torch dtypes.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptError, CorruptCheckpoint, UnsafeCheckpoint
from . import dcp_types as dt
from .safe_pickle_policy import _ints

METADATA_FILE = ".metadata"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


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


_DCP = "torch.distributed.checkpoint"
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(f"{_DCP}.metadata", n): getattr(dt, n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta")},
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): dt.enum_by_value(dt._MEM_FORMAT_ENCODING),
    # megatron keeps its save plans in the metadata (`all_local_plans`, for cached re-saves)
    **{(f"{_DCP}.planner", n): getattr(dt, n) for n in (
        "SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData")},
    (f"{_DCP}.planner", "WriteItemType"): dt.enum_by_value(dt.WriteItemType),
    (f"{_DCP}.filesystem", "_StorageInfo"): dt._StorageInfo,
    (f"{_DCP}.filesystem", "_StoragePrefix"): dt._StoragePrefix,
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): dt.MCoreMetadata,
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


def load_metadata(directory: Path) -> dt.Metadata:
    """The checked DCP Metadata (our `dcp_types` stand-ins) of the checkpoint in ``directory``."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CorruptCheckpoint(f"no {METADATA_FILE} (torch.distributed.checkpoint metadata)", path=path,
                                fix="the save did not finish; copy the complete checkpoint directory")
    try:
        with open(path, "rb") as fh:
            md = _MetadataUnpickler(fh, path).load()
        _check(md, path)
    except (CkptError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - any other failure means a malformed file
        raise CorruptCheckpoint(f"cannot unpickle ({type(e).__name__}: {e})"[:300], path=path,
                                fix="re-copy the file") from None
    return md


def _is_shape(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _check(md: Any, path: Path) -> None:
    if not isinstance(md, dt.Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CorruptCheckpoint("not a torch.distributed.checkpoint Metadata object", path=path,
                                fix="re-copy the file")
    for key, info in md.storage_data.items():
        if not isinstance(key, dt.MetadataIndex) or not isinstance(key.fqn, str) \
                or not (key.offset is None or _is_shape(key.offset)) or not isinstance(info, dt._StorageInfo):
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
        if not isinstance(fqn, str):
            raise CorruptCheckpoint(f"state_dict_metadata key {fqn!r:.40} is not a name", path=path,
                                    fix="re-copy the file")
        if isinstance(tmd, dt.BytesStorageMetadata):
            if dt.MetadataIndex(fqn) not in md.storage_data:
                raise CorruptCheckpoint("bytes item has no storage entry", path=path, tensor=fqn,
                                        fix="copy the complete checkpoint directory")
            continue
        if not isinstance(tmd, dt.TensorStorageMetadata) or not isinstance(tmd.properties, dt.TensorProperties) \
                or not isinstance(tmd.properties.dtype, torch.dtype) or not _is_shape(tmd.size) \
                or not isinstance(tmd.chunks, list):
            raise CorruptCheckpoint(f"malformed metadata ({type(tmd).__name__})", path=path, tensor=fqn,
                                    fix="re-copy the file")
        for c in tmd.chunks:
            if not isinstance(c, dt.ChunkStorageMetadata) or not _is_shape(c.offsets) or not _is_shape(c.sizes):
                raise CorruptCheckpoint("malformed chunk", path=path, tensor=fqn, fix="re-copy the file")
            if len(c.offsets) != len(tmd.size) or len(c.sizes) != len(tmd.size) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, tmd.size)):
                raise CorruptCheckpoint(f"chunk {tuple(c.offsets)}+{tuple(c.sizes)} lies outside the "
                                        f"global shape {tuple(tmd.size)}", path=path, tensor=fqn,
                                        fix="the metadata is corrupt")
            if dt.MetadataIndex(fqn, c.offsets) not in md.storage_data:
                raise CorruptCheckpoint(f"chunk at {tuple(c.offsets)} has no storage entry", path=path,
                                        tensor=fqn, fix="copy the complete checkpoint directory")
