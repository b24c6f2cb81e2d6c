"""The storage layer of a `torch.distributed.checkpoint` directory, read lazily and by region.

`DcpStore(directory)` loads the checked `.metadata` (see `dcp_metadata`) and reads

* `read(fqn, offsets, sizes)`: any box of a global tensor, assembled from the stored chunks
  that overlap it. Each chunk is a `torch.save` record at (file, offset, length) inside a
  `__R_K.distcp` file; it is opened through our safe unpickler (`TorchFile` over a window of
  the file; parsed once per record) and only the bytes of the part that is needed are read
  (`LazyTensor.load_box`: a contiguous run goes straight into the caller's tensor);
* `read_object(fqn)`: a BYTES item (Megatron stores `torch.save([obj])` there), safely.

No process group, no `torch.load`, no megatron. Not thread-safe (one handle per file).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from ..errors import CorruptCheckpoint
from .dcp_metadata import load_metadata
from .dcp_types import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata
from .mapped import file_target
from .safe_pickle import LazyTensor, TorchFile


class _Window(io.RawIOBase):
    """Bytes [offset, offset + length) of a shared file handle, as a seekable file."""

    def __init__(self, fh: BinaryIO, offset: int, length: int):
        super().__init__()
        self._fh, self._base, self._len, self._pos = fh, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._len - self._pos))
        if not n:
            return 0
        self._fh.seek(self._base + self._pos)
        got = self._fh.readinto(memoryview(buf)[:n])
        self._pos += got or 0
        return got or 0

    def map_target(self) -> tuple[int, int] | None:
        """(fd, offset of this window) of the underlying file, for ``formats.mapped``."""
        base = file_target(self._fh)
        return None if base is None else (base[0], base[1] + self._base)

    def close(self) -> None:  # the shared handle stays open; DcpStore.close() closes it
        super().close()


class DcpStore:
    def __init__(self, directory: Path, *, opener: Callable[[Path], BinaryIO] | None = None):
        self.directory = Path(directory)
        self.metadata = load_metadata(self.directory)
        self._opener = opener or (lambda p: open(p, "rb"))  # noqa: SIM115
        self._handles: dict[str, BinaryIO] = {}
        self._records: dict[tuple, LazyTensor] = {}
        self._tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                         if isinstance(v, TensorStorageMetadata)}

    def tensor_metadata(self) -> dict[str, TensorStorageMetadata]:
        return dict(self._tensors)

    def bytes_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]

    def _window(self, index: MetadataIndex) -> tuple[_Window, Path]:
        info = self.metadata.storage_data[index]
        path = self.directory / info.relative_path
        fh = self._handles.get(info.relative_path)
        if fh is None:
            try:
                fh = self._handles[info.relative_path] = self._opener(path)
            except OSError as e:
                raise CorruptCheckpoint(f"cannot open data file ({e.strerror or e})", path=path, tensor=index.fqn,
                                        fix="copy the complete checkpoint directory") from None
        size = fh.seek(0, 2)
        if info.offset + info.length > size:
            raise CorruptCheckpoint(f"record {info.offset}+{info.length} lies beyond the end of the file "
                                    f"({size} bytes)", path=path, tensor=index.fqn, fix="re-copy the file")
        return _Window(fh, info.offset, info.length), path

    def _record(self, fqn: str, offsets: tuple[int, ...]) -> LazyTensor:
        """The record of one chunk (its zip header is parsed once, then remembered)."""
        key = (fqn, offsets)
        if key not in self._records:
            self._records[key] = self._parse_record(fqn, offsets)
        return self._records[key]

    def _parse_record(self, fqn: str, offsets: tuple[int, ...]) -> LazyTensor:
        window, path = self._window(MetadataIndex(fqn, offsets))
        f = TorchFile(f"{path}@{window._base}", opener=lambda _p: window)
        if not isinstance(f.obj, LazyTensor):
            raise CorruptCheckpoint(f"record holds a {type(f.obj).__name__}, not a tensor", path=path,
                                    tensor=fqn, fix="the checkpoint is corrupt")
        return f.obj

    def read(self, fqn: str, offsets: tuple[int, ...] | None = None,
             sizes: tuple[int, ...] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The box ``offsets``/``sizes`` (default: all) of global tensor ``fqn``, assembled from the
        chunks that overlap it; with ``out`` (a tensor of shape ``sizes``) it is read into ``out``
        (a box that is one contiguous run of one record goes straight from the file into it)."""
        md = self._tensors[fqn]
        shape = tuple(md.size)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else shape
        if out is None:
            out = torch.empty(sizes, dtype=md.properties.dtype)
        elif tuple(out.shape) != sizes or out.dtype != md.properties.dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the box is {sizes} {md.properties.dtype}")
        covered = 0
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)) and shape:
                continue
            lazy = self._record(fqn, tuple(chunk.offsets))
            if tuple(lazy.shape) != tuple(chunk.sizes) or lazy.dtype != md.properties.dtype:
                raise CorruptCheckpoint(f"record is {tuple(lazy.shape)} {lazy.dtype}, metadata says "
                                        f"{tuple(chunk.sizes)} {md.properties.dtype}", path=self.directory,
                                        tensor=fqn, fix="the checkpoint is corrupt")
            dst = out
            for d, (a, b) in enumerate(zip(lo, hi)):
                dst = dst.narrow(d, a - offsets[d], b - a)
            lazy.load_box(tuple(a - c for a, c in zip(lo, chunk.offsets)), tuple(b - a for a, b in zip(lo, hi)), dst)
            covered += math.prod(b - a for a, b in zip(lo, hi))
        if covered != math.prod(sizes):
            raise CorruptCheckpoint(f"stored chunks cover {covered} of the {math.prod(sizes)} elements asked for "
                                    f"(box {offsets}+{sizes})", path=self.directory, tensor=fqn,
                                    fix="copy the complete checkpoint directory")
        return out

    def view(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor | None:
        """The box as a zero-copy view of the file when one stored chunk holds all of it as a
        contiguous run (``LazyTensor.view_box``); None otherwise (``read`` it instead)."""
        md = self._tensors[fqn]
        for chunk in md.chunks:
            if all(c <= o and o + s <= c + n for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)):
                lazy = self._record(fqn, tuple(chunk.offsets))
                if tuple(lazy.shape) != tuple(chunk.sizes) or lazy.dtype != md.properties.dtype:
                    return None       # read() raises the typed error
                return lazy.view_box(tuple(o - c for o, c in zip(offsets, chunk.offsets)), tuple(sizes))
        return None

    def read_object(self, fqn: str):
        """A BYTES item unpickled safely (a `torch.save` payload); None if it is not one."""
        window, path = self._window(MetadataIndex(fqn))
        try:
            return TorchFile(f"{path}@{window._base}", opener=lambda _p: window).obj
        except CorruptCheckpoint:
            return None

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles, self._records = {}, {}
