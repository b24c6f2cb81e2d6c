"""A plain torch DCP checkpoint (what `dcp.save(state_dict)` writes), streamed: Writer.

    DST/.metadata        torch.distributed.checkpoint Metadata (written by torch's FileSystemWriter)
    DST/__0_K.distcp     one record file per tensor
    DST/config.json      the HF config (+ tokenizer files): DCP loaders ignore them, ckptconv reads them

Each tensor is one whole chunk under its key, so any world size loads it: `dcp.load` reads
the part of each chunk that overlaps a rank's shard (FSDP2, TP, ...). The streaming is the
torch_dist writer's (``megatron_dist_write``): torch's `FileSystemWriter` pulls each item
through a lazy save planner, and ``write(name, t)`` hands the tensor to it through a one-slot
rendezvous, so at most the tensor being serialised and the one being produced are alive.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..errors import LayoutError
from ..types import TensorMeta
from .closing import CommitsOnExit
from .megatron_dist_write import _Aborted, _FileSystemWriter, _Handoff, _item, _LazySavePlanner, save_no_dist
from torch.distributed.checkpoint.planner import WriteItemType


class DcpWriter(CommitsOnExit):
    def __init__(self, out_dir: Path, metas: list[TensorMeta]):
        self.out_dir = Path(out_dir)
        self._metas = {m.name: m for m in metas}
        items = [_item(m.name, (0,) * len(m.shape), m.shape, m.shape, m.dtype, WriteItemType.TENSOR) for m in metas]
        self._handoff = _Handoff()
        self._written: set[str] = set()
        self._failure: BaseException | None = None
        planner = _LazySavePlanner(items, lambda item: self._handoff.take(item.index.fqn))
        storage = _FileSystemWriter(self.out_dir, single_file_per_rank=False, sync_files=False,
                                    thread_count=1, per_thread_copy_ahead=0)
        self._thread = threading.Thread(target=self._save, args=(planner, storage), daemon=True,
                                        name="ckptconv-dcp-writer")
        self._started = False

    def _save(self, planner, storage) -> None:
        self._failure = save_no_dist(planner, storage)
        if self._failure is not None:
            self._handoff.fail(self._failure)

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        meta = self._metas.get(name)
        if meta is None:
            raise LayoutError("tensor is not in the plan", tensor=name, fix="this is a bug in the caller")
        if tuple(tensor.shape) != meta.shape:
            raise LayoutError(f"shape {tuple(tensor.shape)} != planned {meta.shape}", tensor=name)
        if name in self._written:
            raise LayoutError("tensor written twice", tensor=name)
        self._written.add(name)
        self._start()
        self._handoff.put(name, tensor.detach().to(meta.dtype).contiguous())

    def close(self) -> None:
        self._start()
        try:
            self._handoff.close()
            self._thread.join()
        except BaseException:
            self.abort()
            raise
        if self._failure is not None:
            raise self._failure

    def abort(self) -> None:
        self._handoff.fail(_Aborted())
        if self._started:
            self._thread.join()
