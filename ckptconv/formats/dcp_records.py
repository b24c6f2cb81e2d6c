"""The storage layer of ckptconv's DCP writes: records streamed into a few large files, hashed on
the way, and the `.metadata` that indexes them.

torch's `FileSystemWriter` writes one `torch.save` per item into one file per item (about 1,800
files for a 126-layer model), computes a CRC-32 of every record and leaves the integrity manifest
to a second pass that re-reads every byte. `RecordStorageWriter` writes the items of a rank in plan
order into ``__<rank>_<k>.distcp`` files of up to ``file_bytes`` each, every tensor item as exactly
what `torch.save(tensor)` writes (`torch_save_stream.write_tensor_record`; no CRC-32, which
torch.load never checks), every BYTES item as its raw bytes (as torch writes them), and the
SHA-256 of each file is computed from the bytes as they are written, on a second thread while
the writing thread writes them (`digests`: file name ->
hex digest, for `megatron_dist_integrity.write_manifest`). `write_metadata` then writes the
`.metadata` torch's writer would (`dcp_metadata_write`), without importing torch's DCP package.

A tensor item's data is a contiguous CPU tensor, or any object with ``nbytes`` and ``blocks()``
(an iterator of contiguous CPU tensors whose bytes, in order, are the tensor's row-major bytes):
the record is then written block by block and the whole tensor is never in memory.
"""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .dcp_metadata_write import PlanItem, Stored, metadata_bytes
from .dcp_metadata import METADATA_FILE
from .torch_save_stream import write_tensor_record

FILE_BYTES = 2 << 30          # start a new data file beyond this
_PIECE = 8 << 20              # hash and write in pieces this large (hot in cache for the hash)
_PARALLEL = 1 << 20           # pieces at least this large are hashed on the hasher thread


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (made contiguous if it is not), without a copy when it is."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class HashingFile:
    """A write-only file that hashes (SHA-256) every byte written, counts its position, and turns
    torch's zip writer's relative seek over a record's data into a call of the pending ``fill``."""

    def __init__(self, path: Path, hasher: ThreadPoolExecutor | None = None):
        self.path = Path(path)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._h = hashlib.sha256()
        self._hasher = hasher           # hashes a large piece while this thread writes it
        self.pos = 0
        self._fill: Any = None
        self._expect = 0
        # torch's C++ zip writer must never see an exception (it finishes archives in destructors,
        # where one aborts the process): the first error is kept here, later writes are dropped
        self.error: BaseException | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                for at in range(0, len(view), _PIECE):
                    piece = view[at:at + _PIECE]
                    if self._hasher is None or len(piece) < _PARALLEL:
                        self._h.update(piece)
                        self._f.write(piece)
                        continue
                    # both release the GIL: the piece is hashed and written side by side (in order:
                    # the next piece waits), and the caller's buffer is free again when we return
                    hashed = self._hasher.submit(self._h.update, piece)
                    try:
                        self._f.write(piece)
                    finally:
                        hashed.result()
            except BaseException as e:  # noqa: BLE001 - re-raised by check()
                self.error = e
        self.pos += len(view)
        return len(view)

    def check(self) -> None:
        """Raise the first error met while writing (see ``error``)."""
        if self.error is not None:
            raise self.error

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self._f.flush()

    def expect(self, fill, nbytes: int) -> None:
        self._fill, self._expect = fill, nbytes

    def seek(self, offset: int, whence: int = 0) -> int:
        fill, self._fill = self._fill, None
        start = self.pos
        if whence != 1 or fill is None or offset != self._expect:
            self.error = self.error or OSError(f"unexpected seek({offset}, {whence}) writing {self.path.name}")
        elif self.error is None:
            try:
                fill(self)
            except BaseException as e:  # noqa: BLE001 - re-raised by check()
                self.error = e
            if self.error is None and self.pos - start != offset:
                self.error = OSError(f"{self.pos - start} bytes written for a record of {offset} bytes "
                                     f"in {self.path.name}")
        self.pos = start + offset
        return self.pos

    def close(self) -> str:
        self._f.close()
        return self._h.hexdigest()


def write_tensor_data(f: HashingFile, data: Any) -> None:
    """The bytes of a tensor item into ``f``: a tensor at once, a block source block by block."""
    if isinstance(data, torch.Tensor):
        if data.numel():
            f.write(tensor_bytes(data))
        return
    for block in data.blocks():
        f.write(tensor_bytes(block))


class RecordStorageWriter:
    def __init__(self, path: Path, file_bytes: int | None = None):
        self.path = Path(path)
        self.file_bytes = FILE_BYTES if file_bytes is None else file_bytes
        self.digests: dict[str, str] = {}

    def write_items(self, items: Iterable[PlanItem], resolve: Callable[[PlanItem], Any],
                    rank: int = 0) -> dict[tuple, Stored]:
        """Write each item's data (``resolve(item)``: a tensor, a block source, or bytes for a BYTES
        item) in order; where each record landed, by ``item.key``."""
        self.path.mkdir(parents=True, exist_ok=True)
        stored: dict[tuple, Stored] = {}
        f: HashingFile | None = None
        count = 0
        hasher = ThreadPoolExecutor(1, thread_name_prefix="ckptconv-hash")
        try:
            for item in items:
                if f is None or f.pos >= self.file_bytes:
                    if f is not None:
                        self.digests[f.path.name] = f.close()
                    f = HashingFile(self.path / f"__{rank}_{count}.distcp", hasher)
                    count += 1
                data = resolve(item)
                offset = f.pos
                if item.is_bytes:
                    f.write(data.getbuffer() if isinstance(data, io.BytesIO) else data)
                else:
                    write_tensor_record(f, item.sizes, item.dtype, lambda ff, d=data: write_tensor_data(ff, d))
                f.check()
                stored[item.key] = Stored(f.path.name, offset, f.pos - offset)
        finally:
            if f is not None:
                self.digests[f.path.name] = f.close()
            hasher.shutdown()
        return stored

    def write_metadata(self, items: list[PlanItem], stored: dict[tuple, Stored]) -> None:
        """The `.metadata` of the whole save (every rank's records in ``stored``)."""
        (self.path / METADATA_FILE).write_bytes(metadata_bytes(items, stored))
