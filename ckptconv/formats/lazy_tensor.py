"""The tensor leaf of ``safe_pickle``: shape / dtype / strides from the pickle, bytes read from
its ``data/<key>`` record only when asked (``load``, ``load_slice``, ``load_box``), or mapped
without a copy (``view_box``). The record is reached through the archive that unpickled it
(``_Archive.read`` / ``_Archive.region`` in ``safe_pickle``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


class _StorageRef(NamedTuple):
    """Lazy reference to one ``data/<key>`` record (nothing read)."""
    archive: Any
    key: str
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True, eq=False, slots=True)
class LazyTensor:
    """A tensor leaf: ``shape``, ``dtype``, ``stride``, ``storage_offset`` (in elements) and
    ``name`` (dotted path in the tree); ``load()`` reads only the bytes this view covers."""
    _ref: _StorageRef
    dtype: torch.dtype
    storage_offset: int
    shape: tuple
    stride: tuple
    _flags: tuple = (False, False)  # (conj, neg) bits of the tensor metadata
    name: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _span(self) -> int:
        """Elements from storage_offset to the last one the view touches (inclusive)."""
        return 0 if self.numel == 0 else 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))

    def load_slice(self, dim: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``load()`` narrowed to ``start:stop`` along ``dim``, reading only the bytes it spans;
        with ``out`` (a tensor of the slice's shape and dtype) the values land there, and a
        contiguous little-endian slice is read straight into it (no intermediate copy)."""
        if not 0 <= start <= stop <= self.shape[dim]:
            raise IndexError(f"slice {start}:{stop} of dim {dim} out of range for {self.shape}")
        shape = self.shape[:dim] + (stop - start,) + self.shape[dim + 1:]
        part = LazyTensor(self._ref, self.dtype, self.storage_offset + start * self.stride[dim],
                          shape, self.stride, self._flags, self.name)
        if out is None:
            return part.load()
        if tuple(out.shape) != shape or out.dtype != self.dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the slice is {shape} {self.dtype}")
        direct = (out.is_contiguous() and not any(self._flags) and not self._ref.archive.big_endian
                  and part.numel and _row_major(shape, self.stride))
        if direct:
            isz = self.dtype.itemsize
            self._ref.archive.read(self._ref.key, part.storage_offset * isz, part.numel * isz, self.name,
                                   out=out.view(-1).view(torch.uint8))
        else:
            out.copy_(part.load())
        return out

    def _run(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int | None, list[int]]:
        """(storage element where the box starts if it is one contiguous run of this little-endian
        row-major record, else None; the dims the box cuts). Size-1 dims up to the last dim the
        box cuts, full dims after it, make a run."""
        if len(offsets) != len(self.shape) or any(o < 0 or o + n > full for o, n, full in zip(offsets, sizes, self.shape)):
            raise IndexError(f"box {tuple(offsets)}+{tuple(sizes)} out of range for {self.shape}")
        partial = [d for d, (o, n, full) in enumerate(zip(offsets, sizes, self.shape)) if (o, n) != (0, full)]
        run = not partial or all(n == 1 for n in sizes[:partial[-1]])
        if not run or any(self._flags) or self._ref.archive.big_endian or not _row_major(self.shape, self.stride):
            return None, partial
        return self.storage_offset + sum(o * st for o, st in zip(offsets, self.stride)), partial

    def load_box(self, offsets: tuple[int, ...], sizes: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
        """The box ``offsets``/``sizes`` of this tensor written into ``out`` (shape ``sizes``). A
        box that is one contiguous run of a row-major record (size-1 dims up to the last cut
        dim, full dims after it) is read straight into a contiguous ``out``."""
        if tuple(out.shape) != tuple(sizes) or out.dtype != self.dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the box is {tuple(sizes)} {self.dtype}")
        at, partial = self._run(offsets, sizes)
        if at is not None and out.is_contiguous() and out.numel():
            isz = self.dtype.itemsize
            self._ref.archive.read(self._ref.key, at * isz, out.numel() * isz, self.name,
                                   out=out.view(-1).view(torch.uint8))
            return out
        if not partial:
            return out.copy_(self.load())
        first = partial[0]
        part = self.load_slice(first, offsets[first], offsets[first] + sizes[first])
        for d in partial[1:]:
            part = part.narrow(d, offsets[d], sizes[d])
        return out.copy_(part)

    def view_box(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor | None:
        """The box as a zero-copy view of the file (``formats.mapped``) when it is one contiguous
        run of a little-endian row-major record (see ``load_box``); None otherwise."""
        at, _ = self._run(offsets, sizes)
        if at is None:
            return None
        isz = self.dtype.itemsize
        raw = self._ref.archive.region(self._ref.key, at * isz, math.prod(sizes) * isz, self.name)
        return None if raw is None else raw.view(self.dtype).view(tuple(sizes))

    def load(self) -> torch.Tensor:
        """The logical values as a fresh contiguous CPU tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        isz, arc = self.dtype.itemsize, self._ref.archive
        raw = arc.read(self._ref.key, self.storage_offset * isz, self._span() * isz, self.name)
        if arc.big_endian and isz > 1:
            raw = raw.view(-1, isz // 2 if self.dtype.is_complex else isz).flip(-1).reshape(-1)
        flat = raw.view(self.dtype)
        t = flat.as_strided(self.shape, self.stride, 0)
        if not (t.is_contiguous() and t.numel() == flat.numel()):
            t = t.clone(memory_format=torch.contiguous_format)
        t = t.conj_physical() if self._flags[0] else t
        return -t if self._flags[1] else t

    def __repr__(self) -> str:
        return f"LazyTensor({self.name or '?'}, shape={self.shape}, dtype={self.dtype})"


def _row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True
