"""A pickle writer for a closed set of values, naming classes by module and name without importing them.

``pickle.dumps`` finds every class it writes in its module, so pickling torch's DCP metadata
classes means importing `torch.distributed.checkpoint` (seconds). What a `.metadata` file holds
is plain data with a few class references, so it is written here as protocol-2 opcodes from:

* ``None``, ``bool``, ``int``, ``str``, ``tuple``, ``list``, ``dict``;
* `Global(module, name)`: the object ``module.name`` (``GLOBAL``; memoised, written once);
* `Call(fn, args)`: ``fn(*args)`` (``REDUCE``), e.g. ``torch.Size((2, 3))``;
* `New(cls, state)`: ``cls.__new__(cls)`` then ``__setstate__(state)`` or a ``__dict__`` update
  (``NEWOBJ`` + ``BUILD``), what pickle writes for a dataclass; no ``BUILD`` when state is None.

``pickle.load`` rebuilds exactly what ``pickle.dumps`` of the real objects would have given.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True, eq=False)      # hashed by identity: may be a dict key (a MetadataIndex)
class Call:
    fn: Global
    args: tuple


@dataclass(frozen=True, eq=False)
class New:
    cls: Global
    state: Any = None


class _Emitter:
    def __init__(self):
        self.out = io.BytesIO()
        self._memo: dict[Global, int] = {}

    def emit(self, v: Any) -> None:
        w = self.out.write
        if v is None:
            w(b"N")
        elif v is True or v is False:
            w(b"\x88" if v else b"\x89")
        elif isinstance(v, int):
            if -(1 << 31) <= v < (1 << 31):
                w(b"J" + struct.pack("<i", v))
            else:
                raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                w(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(v, str):
            raw = v.encode("utf-8")
            w(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(v, tuple):
            w(b"(")
            for x in v:
                self.emit(x)
            w(b"t")
        elif isinstance(v, list):
            w(b"](")
            for x in v:
                self.emit(x)
            w(b"e")
        elif isinstance(v, dict):
            w(b"}(")
            for k, x in v.items():
                self.emit(k)
                self.emit(x)
            w(b"u")
        elif isinstance(v, Global):
            self._global(v)
        elif isinstance(v, Call):
            self._global(v.fn)
            self.emit(tuple(v.args))
            w(b"R")
        elif isinstance(v, New):
            self._global(v.cls)
            w(b")\x81")
            if v.state is not None:
                self.emit(v.state)
                w(b"b")
        else:
            raise TypeError(f"pickle_emit cannot write a {type(v).__name__}")

    def _global(self, g: Global) -> None:
        if g in self._memo:
            self.out.write(b"j" + struct.pack("<I", self._memo[g]))       # LONG_BINGET
            return
        if "\n" in g.module + g.name:
            raise ValueError(f"bad global name {g.module}.{g.name}")
        self.out.write(b"c" + f"{g.module}\n{g.name}\n".encode("utf-8"))
        self._memo[g] = len(self._memo)
        self.out.write(b"r" + struct.pack("<I", self._memo[g]))            # LONG_BINPUT


def dumps(value: Any) -> bytes:
    """The protocol-2 pickle of ``value`` (see the module docstring for what it may hold)."""
    e = _Emitter()
    e.out.write(b"\x80\x02")
    e.emit(value)
    e.out.write(b".")
    return e.out.getvalue()
