"""Read ``torch.save`` zip checkpoints without executing pickled code (never ``torch.load``).

Holds :class:`TorchFile` (``.obj`` is the unpickled tree), :func:`load_tree`,
:func:`materialize`, :func:`iter_lazy` and the leaves :class:`LazyTensor` (shape/dtype from
the pickle; bytes read only by ``load()``) and :class:`Placeholder` (inert stand-in object).

Which pickle globals are rebuilt, refused (:class:`UnsafeCheckpoint`) or replaced by a
:class:`Placeholder` is decided in :mod:`ckptconv.formats.safe_pickle_policy` (whose names
are re-exported here); this module adds the tensor rebuilders that produce LazyTensors.

A LazyTensor reads only its own byte range of its ``data/<key>`` record (absolute offset from
the zip local header). After :meth:`TorchFile.close`, ``LazyTensor.load()`` raises ValueError;
trees from :func:`load_tree` keep the file open until their last LazyTensor is garbage.
Not thread-safe (one file handle: seek + read).
"""
from __future__ import annotations

import argparse
import copy
import io
import pickle
import struct
import weakref
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from ..errors import CorruptCheckpoint, UnsafeCheckpoint
from .closing import ClosesOnExit
from .lazy_tensor import LazyTensor, _StorageRef
from .mapped import file_target, map_region
from .safe_pickle_policy import _ALLOWLIST, Placeholder, _find_global, _ints, _Safe, _StorageType

__all__ = ["LazyTensor", "Placeholder", "TorchFile", "iter_lazy", "load_tree", "materialize"]

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_REFETCH = "re-download or re-copy the file"


class _Archive:
    """An open zip file; reads byte ranges of its ``data/<key>`` records."""

    def __init__(self, path: Path, fh: BinaryIO):
        self.path, self.fh, self.closed, self._data_at = path, fh, False, {}
        try:
            self.zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            fh.seek(0)
            legacy = fh.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
            fh.close()
            if legacy:
                raise CorruptCheckpoint("legacy (pre-1.6, non-zip) torch.save format is not "
                                        "supported", path=path, fix="re-save it with torch>=1.6 "
                                        "in a trusted environment") from None
            raise CorruptCheckpoint(f"not a torch.save zip file or truncated ({_one_line(e)})",
                                    path=path, fix=_REFETCH) from None
        names = self.zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        first = names[0].split("/", 1)[0] + "/" if names else ""
        self.prefix = first if first + "data.pkl" in pkls else pkls[0][:-8] if pkls else None
        self.infos = {i.filename: i for i in self.zf.infolist()}
        order = self.record_bytes(f"{self.prefix}byteorder").strip() \
            if self.prefix is not None and f"{self.prefix}byteorder" in self.infos else b"little"
        if self.prefix is None or order not in (b"little", b"big"):
            self.close()
            raise CorruptCheckpoint("no <archive>/data.pkl record" if self.prefix is None else
                                    f"unknown byteorder {order[:20]!r}", path=path,
                                    fix="the file is not a torch.save checkpoint; re-create it")
        self.big_endian = order == b"big"
        weakref.finalize(self, _close_quietly, self.zf, fh)

    def close(self) -> None:
        self.closed = True
        _close_quietly(self.zf, self.fh)

    def record_bytes(self, rec: str) -> bytes:
        """The whole (small, stored) record ``rec``, read at its offset: no CRC-32 check, which
        torch.load does not make either (torch writes 0 with ``compute_crc32=False``)."""
        info = self.infos[rec]
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpoint(f"record {rec} is compressed", path=self.path, fix=_REFETCH)
        self.fh.seek(self._data_offset(rec, None))
        data = self.fh.read(info.file_size)
        if len(data) != info.file_size:
            raise CorruptCheckpoint(f"file truncated inside {rec}", path=self.path, fix=_REFETCH)
        return data

    def read(self, key: str, start: int, length: int, tensor: str | None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes ``[start, start+length)`` of record ``data/<key>`` as a fresh uint8 tensor, or
        read straight into ``out`` (a contiguous uint8 tensor of ``length`` bytes)."""
        if self.closed:
            raise ValueError(f"LazyTensor {tensor or key} read after its TorchFile ({self.path}) "
                             "was closed; load it inside the with-block or use load_tree()")
        rec = f"{self.prefix}data/{key}"
        info = self.infos.get(rec)
        problem = ("is missing" if info is None else
                   "is compressed" if info.compress_type != zipfile.ZIP_STORED else
                   f"has {info.file_size} bytes, the tensor needs bytes {start}..{start + length}"
                   if start + length > info.file_size else None)
        if problem:
            raise CorruptCheckpoint(f"storage record {rec} {problem}", path=self.path,
                                    tensor=tensor, fix=_REFETCH)
        data_at = self._data_offset(rec, tensor)
        buf = torch.empty(length, dtype=torch.uint8) if out is None else out
        view, got = memoryview(buf.numpy()), 0
        self.fh.seek(data_at + start)
        while got < length:
            n = self.fh.readinto(view[got:])
            if not n:
                raise CorruptCheckpoint(f"file truncated inside {rec} (got {got} of {length} "
                                        "bytes)", path=self.path, tensor=tensor, fix=_REFETCH)
            got += n
        return buf

    def _data_offset(self, rec: str, tensor: str | None) -> int:
        """Where record ``rec``'s bytes start in the file (its local zip header parsed once)."""
        if rec not in self._data_at:
            info = self.infos[rec]
            self.fh.seek(info.header_offset)
            head = self.fh.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise CorruptCheckpoint(f"bad zip local header for {rec}", path=self.path,
                                        tensor=tensor, fix=_REFETCH)
            self._data_at[rec] = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))
        return self._data_at[rec]

    def region(self, key: str, start: int, length: int, tensor: str | None) -> torch.Tensor | None:
        """Bytes ``[start, start+length)`` of record ``data/<key>`` as a zero-copy mapped uint8
        tensor (see ``mapped``), or None when they cannot be mapped (the caller reads instead)."""
        rec = f"{self.prefix}data/{key}"
        info = self.infos.get(rec)
        if self.closed or info is None or info.compress_type != zipfile.ZIP_STORED or start + length > info.file_size:
            return None
        target = file_target(self.fh)
        if target is None:
            return None
        return map_region(target[0], target[1] + self._data_offset(rec, tensor) + start, length)


def _close_quietly(*handles: Any) -> None:
    for h in handles:
        try:
            h.close()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _rebuild_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                hooks: Any = None, dtype: Any = None, metadata: Any = None) -> LazyTensor:
    if not isinstance(storage, _StorageRef):
        raise ValueError("tensor rebuilt from something that is not a storage reference")
    dtype = storage.dtype if dtype is None else dtype
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(dtype, torch.dtype) or type(offset) is not int or offset < 0 \
            or len(shape) != len(strides):
        raise ValueError(f"bad tensor dtype/offset/rank {dtype!r:.30} {offset!r:.30} {shape} {strides}")
    md = metadata if isinstance(metadata, dict) else {}
    lt = LazyTensor(storage, dtype, offset, shape, strides, (bool(md.get("conj")), bool(md.get("neg"))))
    if lt.numel and (offset + lt._span()) * dtype.itemsize > storage.nbytes:
        raise ValueError(f"view {shape}/{strides}+{offset} exceeds storage data/{storage.key} "
                         f"({storage.nbytes} bytes)")
    return lt


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                hooks: Any = None, metadata: Any = None) -> LazyTensor:
    return _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, None, metadata)


_TABLE: dict[tuple[str, str], Any] = {
    **_ALLOWLIST,
    ("torch._utils", "_rebuild_tensor"): _Safe(_rebuild_v2, "torch._utils._rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"): _Safe(_rebuild_v2, "torch._utils._rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"): _Safe(_rebuild_v3, "torch._utils._rebuild_tensor_v3"),
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, archive: _Archive):
        super().__init__(file, encoding="utf-8")  # as torch.load does
        self._archive, self._placeholders = archive, {}
        # a per-load class, so BUILD on it cannot touch the real argparse.Namespace
        ns = type("Namespace", (), {"__new__": lambda cls, *a, **k: argparse.Namespace(**k)})
        self._table = {("argparse", "Namespace"): ns, **_TABLE}

    def find_class(self, module: str, name: str) -> Any:
        return _find_global(module, name, self._table, self._placeholders, self._archive.path)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(stype, _StorageType) or not isinstance(key, str) \
                or type(numel) is not int or numel < 0:
            raise ValueError(f"bad storage reference {pid!r:.80}")
        return _StorageRef(self._archive, key, stype.dtype, numel * stype.dtype.itemsize)


class TorchFile(ClosesOnExit):
    """An open ``torch.save`` file; ``.obj`` is the tree with LazyTensor / Placeholder leaves.

    ``opener(path) -> binary file`` may be given (e.g. to count reads); default ``open(p, 'rb')``."""

    def __init__(self, path: str | Path, *, opener: Callable[[Path], BinaryIO] | None = None):
        self.path = Path(path)
        try:
            fh = opener(self.path) if opener else open(self.path, "rb")  # noqa: SIM115
        except OSError as e:
            raise CorruptCheckpoint(f"cannot open ({_one_line(e)})", path=self.path,
                                    fix="check the path and permissions") from None
        self._archive = _Archive(self.path, fh)
        try:
            pkl = self._archive.record_bytes(self._archive.prefix + "data.pkl")
            self.obj = _SafeUnpickler(io.BytesIO(pkl), self._archive).load()
        except (UnsafeCheckpoint, CorruptCheckpoint):
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - anything else means a malformed pickle
            self.close()
            raise CorruptCheckpoint(f"data.pkl cannot be unpickled ({_one_line(e)})", path=self.path,
                                    fix=_REFETCH) from None
        for name, lt in iter_lazy(self.obj):
            if lt.name is None:
                object.__setattr__(lt, "name", name)

    def tensors(self) -> Iterator[tuple[str, LazyTensor]]:
        """(dotted path, LazyTensor) for every tensor leaf, in tree order."""
        return iter_lazy(self.obj)

    def close(self) -> None:
        self._archive.close()


def load_tree(path: str | Path) -> Any:
    """The tree of ``path``; its LazyTensors keep the file open until they are all gone."""
    return TorchFile(path).obj


def iter_lazy(obj: Any, prefix: str = "") -> Iterator[tuple[str, LazyTensor]]:
    """(dotted path, LazyTensor) for every LazyTensor reachable from ``obj`` (cycle-safe)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(prefix, obj)]
    while stack:
        path, o = stack.pop()
        if isinstance(o, LazyTensor):
            yield path, o
        elif isinstance(o, (dict, list, tuple, argparse.Namespace, Placeholder)) and id(o) not in seen:
            seen.add(id(o))
            kids = (o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, (list, tuple))
                    else vars(o).items() if isinstance(o, argparse.Namespace) else
                    [("args", o.args), ("state", o.state), ("items", o.items), ("dict_items", o.dict_items)])
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(list(kids)))


def materialize(obj: Any, _memo: dict | None = None) -> Any:
    """A copy of ``obj`` with every LazyTensor loaded: dicts, lists, plain tuples and Namespaces
    are copied, anything else (Placeholders too) is returned as is. For small files only."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, LazyTensor):
        out = memo[id(obj)] = obj.load()
    elif isinstance(obj, dict):
        out = memo[id(obj)] = copy.copy(obj)
        for k in list(out):
            out[k] = materialize(obj[k], memo)
    elif isinstance(obj, argparse.Namespace):
        out = memo[id(obj)] = argparse.Namespace()
        for k, v in vars(obj).items():
            setattr(out, k, materialize(v, memo))
    elif isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(materialize(x, memo) for x in obj)
    elif type(obj) is tuple:
        out = memo[id(obj)] = tuple(materialize(x, memo) for x in obj)
    else:
        out = obj
    return out
