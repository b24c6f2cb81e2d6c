"""Which pickle globals :mod:`ckptconv.formats.safe_pickle` may rebuild, refuse or stub out.

Holds the allowlist (``_ALLOWLIST`` and the safe callables behind it), the refused-module
list ``_DENY``, :class:`Placeholder` (the inert stand-in for any other class) and
:func:`_find_global`, the ``find_class`` rule, applied to ``module.name`` after py2 name fixing:
  1. exact allowlisted names are rebuilt by *our* code: ``collections.OrderedDict``,
     ``argparse.Namespace``, harmless builtins (set, frozenset, slice, complex, int, float, str,
     bool, list, dict, tuple, object, bytes, bytearray), ``_codecs.encode`` (text codecs only),
     torch dtypes, ``torch.Size``, ``torch.device``, the storage classes (``torch.FloatStorage``
     ...), ``torch._utils._rebuild_tensor{,_v2,_v3}`` / ``_rebuild_parameter{,_with_state}`` and
     ``torch._tensor._rebuild_from_type_v2`` (tensors become LazyTensor leaves). The tensor
     rebuilders and the per-load ``argparse.Namespace`` class are added to this table by the
     reader in :mod:`ckptconv.formats.safe_pickle`, which owns ``LazyTensor``;
  2. any other name in a dangerous module (``_DENY``: builtins, os, posix, subprocess, sys,
     shutil, socket, io, functools, operator, pickle, importlib, runpy, codecs, types, ctypes,
     torch, ... and their submodules) raises :class:`UnsafeCheckpoint` naming file and global;
  3. everything else (numpy, megatron, deepspeed, __main__, ...) becomes a fresh
     :class:`Placeholder` subclass; the module is never imported, none of its code runs.
"""
from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import pickle
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from ..errors import UnsafeCheckpoint

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64, "UntypedStorage": torch.uint8}
_DTYPES = {n: getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
_DENY = frozenset(
    "builtins __builtin__ os posix nt posixpath ntpath subprocess _posixsubprocess sys shutil "
    "socket _socket importlib _imp imp runpy pickle _pickle io _io functools _functools operator "
    "_operator torch codecs _codecs types ctypes _ctypes multiprocessing _multiprocessing "
    "webbrowser pty signal _signal platform code codeop pdb bdb copyreg marshal gc inspect ast "
    "threading _thread asyncio tempfile glob zipimport zipfile tarfile urllib http ftplib "
    "smtplib ssl select selectors mmap fcntl resource site sysconfig timeit trace cProfile "
    "profile pydoc doctest atexit pkgutil zipapp venv ensurepip distutils setuptools pip pwd "
    "grp termios tty readline rlcompleter".split())
_TEXT_CODECS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})


class _Safe(NamedTuple):
    """An allowlisted callable implemented by us (a tuple: pickle BUILD cannot alter it)."""
    fn: Callable
    qualname: str

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _StorageType(NamedTuple):
    name: str
    dtype: torch.dtype


class Placeholder:
    """Inert stand-in for an object of a non-allowlisted class; ``qualname`` names the class.

    Records constructor ``args``/``kwargs``, BUILD ``state``, appended ``items`` and set
    ``dict_items``. No ``__getattr__``/properties: attribute access runs no code."""
    qualname = "?"
    pickled_as: tuple[str, str] | None = None     # (module, name) the class was read as

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
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

    def __reduce_ex__(self, protocol: int):
        """Pickled again (by ``RePickler`` only) as the object it stands for: ``cls.__new__(cls,
        *args)`` of the original class, then its state and items (an enum member, e.g.
        Megatron-LM's ``AttnBackend.auto`` in args, comes back as that member)."""
        return (copyreg.__newobj__, (type(self), *self.args), self.state,
                iter(self.items) if self.items else None, iter(self.dict_items.items()) if self.dict_items else None)


class RePickler(pickle._Pickler):
    """A pickler that writes a Placeholder as a reference to the class it stands for (module and
    name as they were read; nothing is imported), so a checkpoint read with our unpickler can be
    written back with its other libraries' objects intact (reshard carries args verbatim)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        where = getattr(obj, "pickled_as", None) if isinstance(obj, type) and issubclass(obj, Placeholder) else None
        if where is None:
            return super().save_global(obj, name)
        module, attr = where
        self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode("utf-8"))
        self.memoize(obj)


class RePickleModule:
    """``pickle_module`` for ``torch.save`` that uses :class:`RePickler`."""
    Pickler = RePickler
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(i) is int and i >= 0 for i in x):
        raise ValueError(f"bad tensor {what} {x!r:.80}")
    return tuple(x)


def _encode(s: Any, enc: str = "utf-8") -> bytes:
    if not isinstance(s, str) or enc not in _TEXT_CODECS:
        raise ValueError(f"refused _codecs.encode({type(s).__name__}, {enc!r:.40})")
    return s.encode(enc)


def _bytes_like(kind: type) -> _Safe:
    def make(*args: Any) -> Any:  # never kind(int): that would allocate attacker-sized memory
        if not args or isinstance(args[0], str):
            return kind(_encode(*args)) if args else kind()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
            return kind(args[0])
        raise ValueError(f"refused {kind.__name__}() arguments")
    return _Safe(make, f"builtins.{kind.__name__}")


def _from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not (isinstance(func, _Safe) and isinstance(args, tuple)):
        raise ValueError("_rebuild_from_type_v2 with a non-allowlisted function")
    return func(*args)  # the tensor subclass and its python state are dropped


def _marker(*args: Any) -> Any:
    raise ValueError("tensor type markers cannot be called")


def _device(*args: Any) -> torch.device:
    if not (1 <= len(args) <= 2 and isinstance(args[0], str) and all(type(a) is int for a in args[1:])):
        raise ValueError(f"bad torch.device arguments {args!r:.60}")
    return torch.device(*args)


# Everything allowlisted except the tensor rebuilders (see safe_pickle._TABLE).
_ALLOWLIST: dict[tuple[str, str], Any] = {
    **{("builtins", t.__name__): t for t in (set, frozenset, slice, complex, int, float, str, bool,
                                             list, dict, tuple, object)},
    ("builtins", "bytes"): _bytes_like(bytes), ("builtins", "bytearray"): _bytes_like(bytearray),
    ("_codecs", "encode"): _Safe(_encode, "_codecs.encode"),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): _Safe(lambda seq=(): torch.Size(_ints(seq, "Size")), "torch.Size"),
    ("torch", "device"): _Safe(_device, "torch.device"),
    **{("torch._utils", n): _Safe(lambda data, *a: data, n)  # Parameter -> plain tensor leaf
       for n in ("_rebuild_parameter", "_rebuild_parameter_with_state")},
    ("torch._tensor", "_rebuild_from_type_v2"): _Safe(_from_type_v2, "_rebuild_from_type_v2"),
    **{(m, n): _Safe(_marker, n) for m, n in (("torch", "Tensor"), ("torch._tensor", "Tensor"),
                                              ("torch.nn.parameter", "Parameter"))},
    **{(m, n): _StorageType(n, dt) for n, dt in STORAGE_DTYPES.items() for m in ("torch", "torch.storage")},
}


def _find_global(module: str, name: str, table: dict[tuple[str, str], Any],
                 placeholders: dict[str, type], path: Path) -> Any:
    """The ``find_class`` rule (see the module docstring); ``placeholders`` caches the
    Placeholder subclass made for each qualname during one load."""
    orig = f"{module}.{name}"
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if module == "torch" and name in _DTYPES:
        return _DTYPES[name]
    if (module, name) in table:
        return table[(module, name)]
    if {orig.split(".", 1)[0], module.split(".", 1)[0]} & _DENY:
        alias = f" (pickled as '{orig}')" if orig != f"{module}.{name}" else ""
        raise UnsafeCheckpoint(f"pickle references forbidden global '{module}.{name}'{alias}; "
                               f"module '{module.split('.')[0]}' is refused unless allowlisted",
                               path=path, fix="load only checkpoints from trusted "
                               "sources, or re-save the tensors with safetensors")
    qual = f"{module}.{name}"
    if qual not in placeholders:
        placeholders[qual] = type(name.rsplit(".", 1)[-1], (Placeholder,), {
            "qualname": qual, "pickled_as": (module, name), "__module__": __name__,
            "__qualname__": f"Placeholder[{qual}]"})
    return placeholders[qual]
