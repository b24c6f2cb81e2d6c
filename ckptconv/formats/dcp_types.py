"""Plain-data stand-ins for the classes a `torch.distributed.checkpoint` `.metadata` pickle names.

Importing torch's own DCP package costs seconds (it pulls in `torch.distributed.tensor` and
more) and we only need its metadata dataclasses as containers, so `dcp_metadata` maps the
pickle's globals to these instead. They mirror torch 2.13's classes field by field
(`metadata.py`, `planner.py`, `filesystem.py`) and megatron's `MCoreMetadata`:

* dataclasses are rebuilt the way pickle rebuilds torch's (`copyreg.__newobj__` + BUILD): our
  `__setstate__` takes the state dict (or a `(dict, slots)` tuple), requires string keys, fills
  absent fields with their defaults and refuses an absent required field. Classes the reader
  trusts to locate bytes (`_STRICT`) refuse unknown fields, which a newer torch could have
  added with a meaning we would ignore; the others keep them as attributes, as pickle would
  (megatron adds `all_local_plans` to `Metadata`), unless the name is private or not an identifier;
* `TensorProperties` has torch's tuple state (dtype, layout, requires_grad, memory-format
  encoding, pin_memory);
* enums are pickled by value; `enum_by_value` gives the one-argument constructor the allowlist uses;
* `MetadataIndex` is frozen, hashes and compares on (fqn, offset) only (not `index`) and keeps
  offsets as `torch.Size`, which hashes and compares like a tuple, so keys read from a file are
  found by `MetadataIndex(fqn, offsets)` built from tuples.

Any error here is a `ValueError`/`TypeError`; `dcp_metadata` reports it as `CorruptCheckpoint`.
"""
from __future__ import annotations

import enum
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Sequence

import torch


class _State:
    """Rebuild a dataclass from a pickle BUILD state, field by field (see the module docstring)."""

    _STRICT = False

    def __setstate__(self, state: Any) -> None:
        cls = type(self).__name__
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{cls}: state is a {type(state).__name__}, not a dict of fields")
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(state) - set(known))
        if unknown and (self._STRICT or any(n.startswith("_") or not n.isidentifier() for n in unknown)):
            raise ValueError(f"{cls}: unknown fields {unknown} (written by a newer torch?)"[:200])
        for name in unknown:        # e.g. megatron's `Metadata.all_local_plans`
            object.__setattr__(self, name, state[name])
        for name, f in known.items():
            if name in state:
                value = state[name]
            elif f.default is not MISSING:
                value = f.default
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                raise ValueError(f"{cls}: required field {name!r} is missing")
            object.__setattr__(self, name, value)


def enum_by_value(cls: type[enum.Enum]) -> Callable[[Any], enum.Enum]:
    """What an enum's pickle (REDUCE cls, (value,)) may call: a lookup of one existing member."""
    def member(value: Any) -> enum.Enum:
        return cls(value)
    return member


# -------------------------------------------------------------------------- metadata.py
@dataclass
class ChunkStorageMetadata(_State):
    _STRICT = True
    offsets: torch.Size
    sizes: torch.Size


class _MEM_FORMAT_ENCODING(enum.Enum):
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


_MEMORY_FORMATS = {
    _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
    _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST: torch.channels_last,
    _MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT: torch.preserve_format,
}


@dataclass
class TensorProperties:
    dtype: torch.dtype = field(default_factory=torch.get_default_dtype)
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise ValueError("TensorProperties: state is not a 5-tuple")
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        if not isinstance(encoding, _MEM_FORMAT_ENCODING):
            raise ValueError(f"TensorProperties: memory format encoding {encoding!r:.40}")
        self.memory_format = _MEMORY_FORMATS[encoding]


@dataclass
class TensorStorageMetadata(_State):
    _STRICT = True
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata(_State):
    _STRICT = True


@dataclass
class StorageMeta(_State):
    checkpoint_id: Any = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata(_State):
    state_dict_metadata: dict[str, Any]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass
class MCoreMetadata(Metadata):
    """megatron-core 0.15's `Metadata` subclass (checkpoints with optimizer state)."""
    mcore_data: Any = field(default_factory=dict)


@dataclass(frozen=True, init=False)
class MetadataIndex(_State):
    _STRICT = True
    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(default=None, hash=False, compare=False)

    def __init__(self, fqn: str, offset: Sequence[int] | None = None, index: int | None = None):
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "offset", None if offset is None else torch.Size(offset))
        object.__setattr__(self, "index", index)


# -------------------------------------------------------------------------- planner.py
class WriteItemType(enum.Enum):
    TENSOR = 1
    SHARD = 2
    BYTE_IO = 3


@dataclass(frozen=True)
class BytesIOWriteData(_State):
    nbytes: int


@dataclass(frozen=True)
class TensorWriteData(_State):
    chunk: ChunkStorageMetadata
    properties: TensorProperties
    size: torch.Size


@dataclass(frozen=True)
class WriteItem(_State):
    index: MetadataIndex
    type: WriteItemType
    bytes_io_data: BytesIOWriteData | None = None
    tensor_data: TensorWriteData | None = None


@dataclass(frozen=True)
class SavePlan(_State):
    items: list[WriteItem]
    storage_data: Any = None
    planner_data: Any = None
    usable: bool = True


# -------------------------------------------------------------------------- filesystem.py
@dataclass
class _StorageInfo(_State):
    _STRICT = True
    relative_path: str
    offset: int
    length: int
    transform_descriptors: Sequence[str] | None = None


@dataclass
class _StoragePrefix(_State):
    prefix: str
