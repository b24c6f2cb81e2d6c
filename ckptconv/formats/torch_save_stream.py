"""Write a ``torch.save``-compatible zip file tensor by tensor (bounded memory).

Holds :class:`TensorSlot` (a planned tensor: name, shape, dtype) and
:class:`StreamingTorchSave`. The pickle (``data.pkl``) is written first from a template whose
tensor leaves are TensorSlots; each slot pickles exactly like a contiguous CPU tensor
(``torch._utils._rebuild_tensor_v2`` over a ``('storage', torch.<T>Storage, key, 'cpu',
numel)`` persistent id; dtypes without a legacy storage class use ``_rebuild_tensor_v3`` like
torch does). Then ``write(name, tensor)`` streams each ``data/<key>`` record, in any order.
Records go through ``torch._C.PyTorchFileWriter``, so alignment and archive naming are
torch's own. Sequence as in ``torch.serialization._save``: data.pkl, .storage_alignment,
byteorder, data/<key>..., then the writer's ``version`` / ``.data/serialization_id``.

``.format_version`` ("1") tells torch.load that ``data/0, data/1, ...`` are laid out in key
order, which it may use to *compute* record offsets (meta/fake loads,
``calculate_storage_offsets``). We therefore write it at close() and only if the records were
actually written in key order; otherwise it is omitted and torch looks every offset up.
"""
from __future__ import annotations

import collections
import copyreg
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LayoutError, MissingTensors, WriteFailed
from .closing import CommitsOnExit
from .safe_pickle_policy import STORAGE_DTYPES, RePickler

_STORAGE_NAMES = {dt: n for n, dt in STORAGE_DTYPES.items() if n != "UntypedStorage"}
_ALIGNMENT = 64


@dataclass(frozen=True)
class TensorSlot:
    """A tensor the template promises: written later with ``StreamingTorchSave.write``."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))  # accept lists / torch.Size


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """torch's contiguous strides (zero-size dims count as 1)."""
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


class _Storage:
    __slots__ = ("pid",)

    def __init__(self, pid: tuple):
        self.pid = pid


def reduce_slot(slot: TensorSlot, key: str) -> tuple:
    """The pickle reduction torch.save writes for a contiguous CPU tensor of ``slot``'s shape and
    dtype stored in record ``data/<key>``."""
    shape = tuple(slot.shape)
    numel = 1
    for s in shape:
        numel *= s
    args = (0, shape, contiguous_stride(shape), False, collections.OrderedDict())
    if slot.dtype in _STORAGE_NAMES:
        stype = getattr(torch, _STORAGE_NAMES[slot.dtype])
        return torch._utils._rebuild_tensor_v2, (_Storage(("storage", stype, key, "cpu", numel)), *args)
    pid = ("storage", torch.UntypedStorage, key, "cpu", numel * slot.dtype.itemsize)
    return torch._utils._rebuild_tensor_v3, (_Storage(pid), *args, slot.dtype)


class _OneSlot:
    """Pickles a lone TensorSlot as storage key "0" (what torch.save of one tensor writes)."""

    def _reduce_slot(self, slot: TensorSlot) -> tuple:
        return reduce_slot(slot, "0")


def write_tensor_record(stream: Any, shape: tuple[int, ...], dtype: torch.dtype, fill) -> None:
    """Write what ``torch.save(tensor, stream)`` writes for a contiguous CPU tensor of ``shape`` and
    ``dtype`` (a zip archive: data.pkl, .format_version, .storage_alignment, byteorder, data/0,
    version, .data/serialization_id; no CRC-32, as torch's ``compute_crc32=False``), without the
    tensor: the bytes of data/0 are asked for by torch's writer seeking over them, and ``stream``
    (a file-like object with ``write`` and relative ``seek``) lets ``fill`` write them then, in
    order. The stream's ``seek(n, 1)`` must call ``fill(n)``."""
    buf = io.BytesIO()
    _SlotPickler(buf, _OneSlot()).dump(TensorSlot("tensor", tuple(shape), dtype))
    data = buf.getvalue()
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    writer = torch._C.PyTorchFileWriter(stream, False, _ALIGNMENT)
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)
    writer.write_record(".storage_alignment", str(_ALIGNMENT), len(str(_ALIGNMENT)))
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    stream.expect(fill, nbytes)
    writer.write_record_metadata("data/0", nbytes)
    writer.write_end_of_file()
    del writer


class _SlotPickler(RePickler):
    """Protocol-2 pickler that turns TensorSlots into torch tensor reductions (and writes the
    Placeholders of a checkpoint read by our unpickler back as the objects they stand for)."""

    def __init__(self, file: io.BytesIO, owner: Any):
        super().__init__(file, protocol=2)
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table[TensorSlot] = owner._reduce_slot
        self._owner = owner

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return obj.pid
        if isinstance(obj, (torch.Tensor, torch.storage.TypedStorage)) or torch.is_storage(obj):
            raise LayoutError("the template holds a real tensor/storage; use a TensorSlot",
                              path=self._owner.path, fix="replace tensors in the template by TensorSlot")
        return None


class StreamingTorchSave(CommitsOnExit):
    """``torch.save(template-with-tensors, path)`` done incrementally.

    ``write(name, tensor)`` for every slot (any order), then ``close()``. Leaving a ``with``
    block by an exception, ``abort()``, or ``close()`` with slots missing deletes the file."""

    def __init__(self, path: str | Path, template: Any):
        self.path = Path(path)
        self._slots: dict[str, tuple[str, TensorSlot]] = {}
        self._written: list[str] = []
        self._writer: Any = None
        self._stream: Any = None
        self._stream_error: OSError | None = None
        buf = io.BytesIO()
        _SlotPickler(buf, self).dump(template)  # before touching the disk
        data = buf.getvalue()
        # Always through a Python file object: torch's C++ writer finishes the archive in its
        # destructor and aborts the process if a write fails there (e.g. disk full). The guard
        # records the first OSError and swallows later writes, so failure is reported by us.
        self._stream = _GuardedFile(self.path)
        # no CRC-32 of the records (torch's own ``compute_crc32=False``): torch.load never checks it,
        # and computing it cost ~15% of a conversion
        self._writer = torch._C.PyTorchFileWriter(self._stream, False, _ALIGNMENT)
        try:
            self._writer.write_record("data.pkl", data, len(data))
            self._writer.write_record(".storage_alignment", str(_ALIGNMENT), len(str(_ALIGNMENT)))
            self._writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        except BaseException:
            self.abort()
            raise

    def _reduce_slot(self, slot: TensorSlot) -> tuple:
        if slot.name in self._slots:
            raise LayoutError("two TensorSlots share a name", path=self.path, tensor=slot.name,
                              fix="give every slot a unique name")
        if not isinstance(slot.dtype, torch.dtype) or any(type(s) is not int or s < 0 for s in slot.shape):
            raise LayoutError(f"bad slot shape/dtype {slot.shape}/{slot.dtype}", path=self.path,
                              tensor=slot.name)
        key = str(len(self._slots))
        self._slots[slot.name] = (key, slot)
        return reduce_slot(slot, key)

    @property
    def slot_names(self) -> list[str]:
        """All slot names in key order (writing in this order lets torch compute offsets)."""
        return list(self._slots)

    @property
    def missing(self) -> list[str]:
        """Slot names not written yet, in template order."""
        done = set(self._written)
        return [n for n in self._slots if n not in done]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the bytes of slot ``name`` now (shape and dtype must match the slot)."""
        if self._writer is None:
            raise LayoutError("write after close/abort", path=self.path, tensor=name)
        if name not in self._slots:
            raise LayoutError("no TensorSlot of that name in the template", path=self.path,
                              tensor=name, fix="add the slot to the template")
        key, slot = self._slots[name]
        if name in self._written:
            raise LayoutError("slot written twice", path=self.path, tensor=name)
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise LayoutError(f"tensor is {tuple(tensor.shape)} {tensor.dtype}, slot expects "
                              f"{slot.shape} {slot.dtype}", path=self.path, tensor=name,
                              fix="convert/reshape the tensor to the planned layout")
        t = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        nbytes = t.numel() * t.element_size()
        if t.storage_offset() or t.untyped_storage().nbytes() != nbytes:
            return self.write_blocks(name, [t])      # a view: its own bytes, no copy
        try:
            self._writer.write_record(f"data/{key}", t.untyped_storage(), nbytes)
        except RuntimeError as e:   # torch's C++ writer reports I/O errors this way
            self.abort()
            raise _write_failed(self.path, name, e) from e
        if self._stream.error is not None:
            err = self._stream.error
            self.abort()
            raise _write_failed(self.path, name, err)
        self._written.append(name)

    def write_blocks(self, name: str, blocks) -> None:
        """Write slot ``name`` from contiguous CPU tensors whose bytes, in order, are the slot's
        (``blocks``: an iterable of them); the whole tensor is never needed at once."""
        if self._writer is None:
            raise LayoutError("write after close/abort", path=self.path, tensor=name)
        if name not in self._slots or name in self._written:
            raise LayoutError("no TensorSlot of that name, or written twice", path=self.path, tensor=name)
        key, slot = self._slots[name]
        nbytes = slot.dtype.itemsize * math.prod(slot.shape)

        def fill(f) -> None:
            for block in blocks:
                if block.dtype != slot.dtype:
                    raise LayoutError(f"block is {block.dtype}, slot expects {slot.dtype}", path=self.path, tensor=name)
                if block.numel():
                    f.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()).cast("B"))

        self._stream.expect(fill, nbytes)
        try:
            self._writer.write_record_metadata(f"data/{key}", nbytes)
        except RuntimeError as e:
            self.abort()
            raise _write_failed(self.path, name, e) from e
        failure = self._stream.take_fill_error()
        io_error = self._stream.error
        if failure is not None or io_error is not None:
            self.abort()
            if failure is not None and not isinstance(failure, OSError):
                raise failure          # e.g. the source's typed error while reading the rows
            raise _write_failed(self.path, name, failure or io_error)
        self._written.append(name)

    def close(self) -> None:
        """Finalise the file; MissingTensors (and no file) if a slot was never written."""
        if self._writer is None:
            return
        missing = self.missing
        if missing:
            self.abort()
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise MissingTensors(f"{len(missing)} of {len(self._slots)} tensor slots never written: "
                                 f"{', '.join(missing[:5])}{more}", path=self.path,
                                 fix="write every TensorSlot before close(); the partial file was deleted")
        keys = [int(self._slots[n][0]) for n in self._written]
        try:
            if keys == sorted(keys):
                self._writer.write_record(".format_version", "1", 1)
            self._writer.write_end_of_file()
            self._release()
        except RuntimeError as e:
            self.abort()
            raise _write_failed(self.path, None, e) from e
        except BaseException:
            self.abort()
            raise
        if self._stream_error is not None:
            err, self._stream_error = self._stream_error, None
            self.abort(force=True)
            raise _write_failed(self.path, None, err)

    def _release(self) -> None:
        self._writer = None  # the C++ writer finishes the archive when it is destroyed
        if self._stream is not None:
            self._stream.close()
            self._stream_error = self._stream.error
            self._stream = None

    def abort(self, force: bool = False) -> None:
        """Stop writing and delete the partial file."""
        if self._writer is None and self._stream is None and not force:
            return
        if self._stream is not None:
            self._stream.discard = True    # the writer's destructor writes into the void
        self._release()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __del__(self) -> None:  # never leave a valid-looking but incomplete file behind
        if getattr(self, "_writer", None) is not None:
            self.abort()


class _GuardedFile:
    """A write-only file for torch's C++ writer that never raises into it: the first OSError
    (ENOSPC, EIO, EFBIG, ...) is kept in ``error`` and later writes are discarded."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.error: OSError | None = None
        self.discard = False
        self._fill = None
        self._expect = 0
        self._fill_error: BaseException | None = None

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if not self.discard and self.error is None:
            try:
                self._f.write(data)
            except OSError as e:
                self.error = e
        return n

    def expect(self, fill, nbytes: int) -> None:
        """The next relative seek of torch's writer skips a record's ``nbytes``: ``fill(self)``
        writes them then (``write_record_metadata``)."""
        self._fill, self._expect = fill, nbytes

    def seek(self, offset: int, whence: int = 0) -> int:
        fill, self._fill = self._fill, None
        if whence != 1 or fill is None or offset != self._expect:
            self._fill_error = OSError(f"unexpected seek({offset}, {whence}) by torch's writer")
            self.discard = True
            return 0
        start = self._f.tell() if self.error is None and not self.discard else None
        try:
            fill(self)
        except BaseException as e:  # noqa: BLE001 - never into torch's C++ writer; raised by the caller
            self._fill_error = e
            self.discard = True
        if start is not None and not self.discard and self.error is None and self._f.tell() - start != offset:
            self._fill_error = OSError(f"{self._f.tell() - start} bytes written for a record of {offset}")
            self.discard = True
        return 0

    def take_fill_error(self) -> BaseException | None:
        e, self._fill_error = self._fill_error, None
        return e

    def flush(self) -> None:
        if not self.discard and self.error is None:
            try:
                self._f.flush()
            except OSError as e:
                self.error = e

    def close(self) -> None:
        try:
            self.flush()
            self._f.close()
        except OSError as e:
            self.error = self.error or e


def _write_failed(path: Path, name: str | None, err: Exception) -> WriteFailed:
    reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    return WriteFailed(f"could not write the file ({reason})", path=path, tensor=name,
                       fix="check free disk space and permissions of the output directory")
