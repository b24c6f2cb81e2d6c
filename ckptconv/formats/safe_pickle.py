"""Read ``torch.save`` zip checkpoints without executing pickled code.

Holds :class:`TorchFile` (open a file, ``.obj`` is the unpickled tree), :func:`load_tree`,
:func:`materialize`, :func:`iter_lazy`, and the leaf types :class:`LazyTensor` (shape/dtype
known, bytes read only by ``load()``) and :class:`Placeholder` (inert stand-in for any
third-party object). ``torch.load`` is never called.

Global rule (``find_class``), applied to ``module.name`` after py2 name fixing:
  1. exact allowlisted names are rebuilt by our own code: ``collections.OrderedDict`` /
     ``defaultdict``, ``argparse.Namespace``, plain builtins (set, frozenset, slice, complex,
     int, float, str, bool, list, dict, tuple, object, bytes, bytearray), ``_codecs.encode``
     (latin-1/utf-8 only), ``copyreg._reconstructor``, torch dtypes, ``torch.Size``,
     ``torch.device``, the typed storage classes, ``torch._utils._rebuild_tensor{,_v2,_v3}``,
     ``_rebuild_parameter{,_with_state}`` and ``torch._tensor._rebuild_from_type_v2``;
  2. anything else in a *dangerous* module (``_DENY`` below: builtins, os, subprocess, sys,
     io, functools, operator, pickle, importlib, torch, ... and their submodules) raises
     :class:`UnsafeCheckpoint` naming the file and the global;
  3. every other global (numpy, megatron, deepspeed, __main__, ...) becomes a fresh
     :class:`Placeholder` subclass; the module is never imported and no code of it runs.

A LazyTensor reads only its own byte range of its ``data/<key>`` record (absolute offset
from the zip local header). After :meth:`TorchFile.close`, ``LazyTensor.load()`` raises
ValueError; trees from :func:`load_tree` keep the file open until the last LazyTensor dies.
Not thread-safe (one file handle, seek + read).
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copy
import pickle
import struct
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

import torch

from ..errors import CorruptCheckpoint, UnsafeCheckpoint

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64, "UntypedStorage": torch.uint8}
_DTYPES = {n: getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
_DENY = frozenset(
    "builtins __builtin__ os posix nt posixpath ntpath subprocess _posixsubprocess sys shutil "
    "socket _socket importlib runpy pickle _pickle io _io functools _functools operator "
    "_operator torch codecs _codecs types ctypes _ctypes multiprocessing _multiprocessing "
    "webbrowser pty signal _signal platform code codeop pdb bdb copyreg marshal gc inspect ast "
    "threading _thread asyncio tempfile glob zipimport zipfile tarfile urllib http ftplib "
    "smtplib ssl select selectors mmap fcntl resource site sysconfig timeit trace cProfile "
    "profile pydoc doctest atexit pkgutil zipapp venv ensurepip distutils setuptools pip "
    "pwd grp termios tty readline rlcompleter builtins _imp imp".split())
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})
_FIX_LOAD = "load only checkpoints from trusted sources, or re-save the tensors with safetensors"


class _Safe(NamedTuple):
    """An allowlisted callable implemented by us (immutable: pickle BUILD cannot alter it)."""
    fn: Callable
    qualname: str

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _StorageType(NamedTuple):
    name: str
    dtype: torch.dtype


class _StorageRef(NamedTuple):
    """Lazy reference to one ``data/<key>`` record (nothing read)."""
    archive: Any
    key: str
    dtype: torch.dtype
    nbytes: int


class Placeholder:
    """Inert stand-in for an object of a non-allowlisted class; ``qualname`` names the class.

    Records constructor ``args``/``kwargs``, BUILD ``state``, appended ``items`` and set
    ``dict_items``. Defines no ``__getattr__``/properties, so attribute access runs no code."""
    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.dict_items = args, kwargs, None, [], {}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def __repr__(self) -> str:
        return f"<Placeholder {self.qualname} args={len(self.args)} state={type(self.state).__name__}>"


@dataclass(frozen=True, eq=False, slots=True)
class LazyTensor:
    """A tensor leaf: ``shape``, ``dtype``, ``stride``, ``storage_offset`` (elements), ``name``
    (path in the tree, when known); ``load()`` reads only the bytes this view covers."""
    _ref: _StorageRef
    dtype: torch.dtype
    storage_offset: int
    shape: tuple
    stride: tuple
    _flags: tuple = (False, False)  # (conj, neg) bits from the tensor metadata
    name: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def _span(self) -> int:
        """Elements from storage_offset to the last element the view touches (inclusive)."""
        return 0 if self.numel == 0 else 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))

    def narrow(self, dim: int, start: int, length: int) -> "LazyTensor":
        if not (0 <= start and length >= 0 and start + length <= self.shape[dim]):
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for shape {self.shape}")
        shape = self.shape[:dim] + (length,) + self.shape[dim + 1:]
        return LazyTensor(self._ref, self.dtype, self.storage_offset + start * self.stride[dim],
                          shape, self.stride, self._flags, self.name)

    def load_slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """``load()[..., start:stop, ...]`` along ``dim``, reading only that slice's bytes."""
        return self.narrow(dim, start, stop - start).load()

    def load(self) -> torch.Tensor:
        """The logical values as a fresh contiguous CPU tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        isz = self.dtype.itemsize
        raw = self._ref.archive.read(self._ref.key, self.storage_offset * isz, self._span() * isz,
                                     self.name)
        if self._ref.archive.big_endian and isz > 1:
            unit = isz // 2 if self.dtype.is_complex else isz
            raw = raw.view(-1, unit).flip(-1).reshape(-1)
        flat = raw.view(self.dtype)
        t = flat.as_strided(self.shape, self.stride, 0)
        if not (t.is_contiguous() and t.numel() == flat.numel()):
            t = t.clone(memory_format=torch.contiguous_format)
        conj, neg = self._flags
        return -t.conj_physical() if (conj and neg) else t.conj_physical() if conj else -t if neg else t

    def __repr__(self) -> str:
        return f"LazyTensor({self.name or '?'}, shape={self.shape}, dtype={self.dtype})"


class _Archive:
    """An open zip file: reads byte ranges of ``data/<key>`` records."""

    def __init__(self, path: Path, fh: BinaryIO):
        self.path, self.fh, self.closed = path, fh, False
        try:
            self.zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            fh.seek(0)
            legacy = fh.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
            fh.close()
            what = ("legacy (pre-1.6, non-zip) torch.save format is not supported" if legacy else
                    f"not a torch.save zip file or truncated ({_one_line(e)})")
            raise CorruptCheckpoint(what, path=path, fix="re-save it with torch>=1.6 torch.save in "
                                    "a trusted environment" if legacy else
                                    "re-download or re-copy the file") from None
        names = self.zf.namelist()
        first = names[0].split("/", 1)[0] + "/" if names else ""
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            self.close()
            raise CorruptCheckpoint("no <archive>/data.pkl record", path=path,
                                    fix="the file is not a torch.save checkpoint; re-create it")
        self.prefix = first if first + "data.pkl" in pkls else pkls[0][:-len("data.pkl")]
        self.infos = {i.filename: i for i in self.zf.infolist()}
        self._data_at: dict[str, int] = {}
        order = self._small(self.prefix + "byteorder", b"little")
        if order not in (b"little", b"big"):
            self.close()
            raise CorruptCheckpoint(f"unknown byteorder record {order[:20]!r}", path=path,
                                    fix="re-create the checkpoint")
        self.big_endian = order == b"big"
        weakref.finalize(self, _close_quietly, self.zf, fh)

    def _small(self, name: str, default: bytes) -> bytes:
        return self.zf.read(name).strip() if name in self.infos else default

    def close(self) -> None:
        self.closed = True
        _close_quietly(self.zf, self.fh)

    def _bad(self, what: str, tensor: str | None, fix: str = "re-download or re-copy the file"):
        return CorruptCheckpoint(what, path=self.path, tensor=tensor, fix=fix)

    def read(self, key: str, start: int, length: int, tensor: str | None) -> torch.Tensor:
        """Bytes ``[start, start+length)`` of record ``data/<key>`` as a fresh uint8 tensor."""
        if self.closed:
            raise ValueError(f"LazyTensor {tensor or key} read after its TorchFile ({self.path}) "
                             f"was closed; load it inside the with-block or use load_tree()")
        rec = f"{self.prefix}data/{key}"
        info = self.infos.get(rec)
        if info is None:
            raise self._bad(f"storage record {rec} is missing", tensor)
        if info.compress_type != zipfile.ZIP_STORED:
            raise self._bad(f"storage record {rec} is compressed", tensor,
                            "re-save with torch.save (records must be stored uncompressed)")
        if start + length > info.file_size:
            raise self._bad(f"storage record {rec} has {info.file_size} bytes, tensor needs "
                            f"bytes {start}..{start + length}", tensor)
        if rec not in self._data_at:
            self.fh.seek(info.header_offset)
            head = self.fh.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise self._bad(f"bad zip local header for {rec}", tensor)
            n, m = struct.unpack("<HH", head[26:30])
            self._data_at[rec] = info.header_offset + 30 + n + m
        buf = torch.empty(length, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        self.fh.seek(self._data_at[rec] + start)
        while got < length:
            k = self.fh.readinto(view[got:])
            if not k:
                raise self._bad(f"file truncated inside {rec} (got {got} of {length} bytes)", tensor)
            got += k
        return buf


def _close_quietly(zf: Any, fh: Any) -> None:
    for h in (zf, fh):
        try:
            h.close()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(i) is int and i >= 0 for i in x):
        raise ValueError(f"bad tensor {what} {x!r:.80}")
    return tuple(x)


def _encode(s: Any, enc: str = "utf-8") -> bytes:
    if not isinstance(s, str) or enc not in _TEXT_ENCODINGS:
        raise ValueError(f"refused _codecs.encode({type(s).__name__}, {enc!r:.40})")
    return s.encode(enc)


def _bytes_like(kind: type) -> Callable:
    def make(*args: Any) -> Any:
        if not args:
            return kind()
        if isinstance(args[0], str):
            return kind(_encode(*args))
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
            return kind(args[0])
        raise ValueError(f"refused {kind.__name__}() arguments")
    return make


def _defaultdict(factory: Any = None, *rest: Any) -> collections.defaultdict:
    ok = factory is None or factory in (list, dict, set, int, float, str, tuple) or (
        isinstance(factory, type) and issubclass(factory, Placeholder))
    if not ok or rest:
        raise ValueError("refused defaultdict factory")
    return collections.defaultdict(factory)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, archive: _Archive):
        super().__init__(file, encoding="utf-8")  # as torch.load does
        self._archive, self._placeholders = archive, {}
        ns = type("Namespace", (), {"__new__": lambda cls, *a, **k: argparse.Namespace(**k)})
        self._table = {("argparse", "Namespace"): ns, **_TABLE}

    def find_class(self, module: str, name: str) -> Any:
        orig = f"{module}.{name}"
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qual = f"{module}.{name}"
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if (module, name) in self._table:
            return self._table[(module, name)]
        if {orig.split(".", 1)[0], module.split(".", 1)[0]} & _DENY:
            raise UnsafeCheckpoint(f"pickle references forbidden global '{orig}' (module "
                                   f"'{module.split('.')[0]}' is refused unless allowlisted)",
                                   path=self._archive.path, fix=_FIX_LOAD)
        if qual not in self._placeholders:
            self._placeholders[qual] = type(name.rsplit(".", 1)[-1], (Placeholder,),
                                            {"qualname": qual, "__module__": __name__})
        return self._placeholders[qual]

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise ValueError(f"bad storage reference {pid!r:.80}")
        return _StorageRef(self._archive, key, stype.dtype, numel * stype.dtype.itemsize)


def _rebuild_v3(storage: Any, offset: int, size: Any, stride: Any, requires_grad: Any = False,
                hooks: Any = None, dtype: Any = None, metadata: Any = None) -> LazyTensor:
    if not isinstance(storage, _StorageRef):
        raise ValueError("tensor rebuilt from something that is not a storage reference")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or type(offset) is not int or offset < 0:
        raise ValueError(f"bad tensor dtype/offset {dtype!r:.40}/{offset!r:.40}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"size {shape} and stride {strides} differ in rank")
    md = metadata if isinstance(metadata, dict) else {}
    lt = LazyTensor(storage, dtype, offset, shape, strides, (bool(md.get("conj")), bool(md.get("neg"))))
    if lt.numel and (offset + lt._span()) * dtype.itemsize > storage.nbytes:
        raise ValueError(f"view {shape}/{strides}+{offset} exceeds storage data/{storage.key} "
                         f"({storage.nbytes} bytes)")
    return lt


def _rebuild_v2(storage: Any, offset: int, size: Any, stride: Any, requires_grad: Any = False,
                hooks: Any = None, metadata: Any = None) -> LazyTensor:
    return _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, None, metadata)


def _from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not (isinstance(func, _Safe) and isinstance(args, tuple)):
        raise ValueError("_rebuild_from_type_v2 with a non-allowlisted function")
    return func(*args)  # subclass type and python state are dropped: the leaf is a LazyTensor


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls() if base is object else cls(state)
    raise ValueError(f"copyreg._reconstructor for {cls!r:.60} refused")


def _not_callable(*args: Any) -> Any:
    raise ValueError("tensor type markers cannot be called")


def _size(seq: Any = ()) -> torch.Size:
    return torch.Size(_ints(seq, "Size"))


def _device(*args: Any) -> torch.device:
    if not (1 <= len(args) <= 2 and isinstance(args[0], str)
            and all(type(a) is int for a in args[1:])):
        raise ValueError(f"bad torch.device arguments {args!r:.60}")
    return torch.device(*args)


_TABLE: dict[tuple[str, str], Any] = {
    **{("builtins", t.__name__): t for t in (set, frozenset, slice, complex, int, float, str, bool,
                                             list, dict, tuple, object)},
    ("builtins", "bytes"): _Safe(_bytes_like(bytes), "builtins.bytes"),
    ("builtins", "bytearray"): _Safe(_bytes_like(bytearray), "builtins.bytearray"),
    ("_codecs", "encode"): _Safe(_encode, "_codecs.encode"),
    ("copyreg", "_reconstructor"): _Safe(_reconstructor, "copyreg._reconstructor"),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): _Safe(_defaultdict, "collections.defaultdict"),
    ("torch", "Size"): _Safe(_size, "torch.Size"),
    ("torch", "device"): _Safe(_device, "torch.device"),
    ("torch._utils", "_rebuild_tensor"): _Safe(_rebuild_v2, "torch._utils._rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"): _Safe(_rebuild_v2, "torch._utils._rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"): _Safe(_rebuild_v3, "torch._utils._rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"): _Safe(lambda d, *a: d, "torch._utils._rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"):
        _Safe(lambda d, *a: d, "torch._utils._rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"): _Safe(_from_type_v2, "torch._tensor._rebuild_from_type_v2"),
    **{(m, n): _Safe(_not_callable, f"{m}.{n}") for m, n in (  # only as a type marker
        ("torch", "Tensor"), ("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter"))},
    **{(m, n): _StorageType(n, dt) for n, dt in STORAGE_DTYPES.items()
       for m in ("torch", "torch.storage")},
}


class TorchFile:
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
            with self._archive.zf.open(self._archive.prefix + "data.pkl") as f:
                self.obj = _SafeUnpickler(f, self._archive).load()
        except (UnsafeCheckpoint, CorruptCheckpoint):
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - anything else means a malformed pickle
            self.close()
            raise CorruptCheckpoint(f"data.pkl cannot be unpickled ({_one_line(e)})", path=self.path,
                                    fix="re-download or re-create the checkpoint") from None
        for name, lt in iter_lazy(self.obj):
            if lt.name is None:
                object.__setattr__(lt, "name", name)

    def tensors(self) -> Iterator[tuple[str, LazyTensor]]:
        """(dotted path, LazyTensor) for every tensor leaf, in tree order."""
        return iter_lazy(self.obj)

    def close(self) -> None:
        self._archive.close()

    def __enter__(self) -> "TorchFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
            continue
        if isinstance(o, (dict, list, tuple, argparse.Namespace, Placeholder)) and id(o) not in seen:
            seen.add(id(o))
            if isinstance(o, dict):
                kids = list(o.items())
            elif isinstance(o, (list, tuple)):
                kids = list(enumerate(o))
            elif isinstance(o, argparse.Namespace):
                kids = list(vars(o).items())
            else:
                kids = [("args", o.args), ("state", o.state), ("items", o.items),
                        ("dict_items", o.dict_items)]
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(kids))


def materialize(obj: Any, _memo: dict | None = None) -> Any:
    """A copy of ``obj`` with every LazyTensor loaded (containers copied; small files only)."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, LazyTensor):
        out = memo[id(obj)] = obj.load()
    elif isinstance(obj, dict):
        out = memo[id(obj)] = copy.copy(obj)
        for k in out:
            out[k] = materialize(obj[k], memo)
    elif isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(materialize(x, memo) for x in obj)
    elif type(obj) is tuple:
        out = memo[id(obj)] = tuple(materialize(x, memo) for x in obj)
    elif isinstance(obj, argparse.Namespace):
        out = memo[id(obj)] = argparse.Namespace()
        for k, v in vars(obj).items():
            setattr(out, k, materialize(v, memo))
    elif isinstance(obj, Placeholder):
        out = memo[id(obj)] = type(obj).__new__(type(obj), *materialize(obj.args, memo))
        out.kwargs, out.state = materialize(obj.kwargs, memo), materialize(obj.state, memo)
        out.items, out.dict_items = materialize(obj.items, memo), materialize(obj.dict_items, memo)
    else:
        out = obj
    return out
