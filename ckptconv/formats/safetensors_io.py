"""Byte-level safetensors file I/O used by :mod:`ckptconv.formats.hf`.

Holds the safetensors <-> torch dtype tables, :func:`read_safetensors_header` (parse and
validate one header without touching tensor bytes), :func:`create_shard` (write a shard's
header and pre-size the file so tensors can later be written at their offsets, in any
order), and the positioned read/write helpers :func:`read_into` and :func:`write_at`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ckptconv.errors import CorruptCheckpoint
from ckptconv.types import TensorMeta

_ST_DTYPES: dict[str, torch.dtype] = {
    k: v for k, v in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
        "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None), "C64": torch.complex64,
    }.items() if v is not None}
_DTYPE_TO_ST = {v: k for k, v in _ST_DTYPES.items()}

_REFIX = "re-download or re-export the checkpoint; the file is damaged or not safetensors"


def read_safetensors_header(path: Path) -> dict[str, tuple[TensorMeta, int]]:
    """Parse and validate one safetensors header without touching tensor bytes.

    Returns ``name -> (meta, absolute data offset)`` in on-disk order. Raises
    :class:`CorruptCheckpoint` naming the file (and tensor) on any inconsistency."""
    path = Path(path)
    size = path.stat().st_size

    def bad(what: str, tensor: str | None = None) -> CorruptCheckpoint:
        return CorruptCheckpoint(what, path=path, tensor=tensor, fix=_REFIX)

    if size < 8:
        raise bad(f"file is {size} bytes, shorter than the 8-byte safetensors length prefix")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("safetensors header is not a JSON object")
    data_len = size - 8 - n
    rows = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad("malformed header entry (needs dtype, shape, data_offsets [begin, end])",
                      name) from None
        if dt not in _ST_DTYPES:
            raise bad(f"unsupported safetensors dtype {dt!r}", name)
        if any(s < 0 for s in shape):
            raise bad(f"negative dimension in shape {list(shape)}", name)
        meta = TensorMeta(name, shape, _ST_DTYPES[dt])
        if not 0 <= begin <= end <= data_len:
            raise bad(f"data_offsets [{begin}, {end}] out of range (data section is "
                      f"{data_len} bytes; file truncated?)", name)
        if end - begin != meta.nbytes:
            raise bad(f"data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
                      f"{list(shape)} x {dt} needs {meta.nbytes}", name)
        rows.append((begin, end, meta))
    rows.sort(key=lambda r: (r[0], r[1]))
    pos = 0
    for begin, end, meta in rows:
        if begin != pos:
            raise bad(f"data_offsets start at {begin}, expected {pos} (gap or overlap)", meta.name)
        pos = end
    if pos != data_len:
        raise bad(f"{data_len - pos} bytes after the last tensor are not covered by the header")
    return {meta.name: (meta, 8 + n + begin) for begin, _, meta in rows}


def create_shard(path: Path, metas: list[TensorMeta], created: list[Path]) -> dict[str, int]:
    """Write the safetensors header for ``metas`` to ``path`` and pre-size the file.

    Returns ``name -> absolute data offset``. ``path`` is appended to ``created`` as soon as
    the file exists, so the caller can delete it if anything later fails."""
    # Widest dtypes first keeps every tensor aligned to its itemsize; offsets contiguous.
    order = sorted(metas, key=lambda m: (-m.dtype.itemsize, m.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for m in order:
        header[m.name] = {"dtype": _DTYPE_TO_ST[m.dtype], "shape": list(m.shape),
                          "data_offsets": [pos, pos + m.nbytes]}
        pos += m.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    f = open(path, "wb")
    created.append(path)
    with f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(base + pos)  # pre-size (sparse where the filesystem allows)
    return {m.name: base + header[m.name]["data_offsets"][0] for m in order}


def read_into(f: BinaryIO, offset: int, view: memoryview, path: Path, tensor: str) -> None:
    """Fill ``view`` with the bytes of ``f`` starting at ``offset`` (positioned read).

    Raises :class:`CorruptCheckpoint` naming ``path`` and ``tensor`` if the file ends first."""
    f.seek(offset)
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise CorruptCheckpoint("file ended while reading the tensor",
                                    path=path, tensor=tensor, fix=_REFIX)
        got += k


def write_at(path: Path, offset: int, data: torch.Tensor) -> None:
    """Write the bytes of the flat uint8 CPU tensor ``data`` at ``offset`` of ``path``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(memoryview(data.numpy()).cast("B"))


def write_blocks(path: Path, offset: int, blocks) -> None:
    """Write contiguous CPU tensors one after the other from ``offset`` of ``path``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        for block in blocks:
            if block.numel():
                f.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()).cast("B"))
