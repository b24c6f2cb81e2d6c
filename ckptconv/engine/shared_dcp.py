"""One DCP checkpoint (Megatron ``torch_dist`` or plain DCP) written collectively by several workers.
 The writer plans every write
  item and each worker keeps only the items of its share (rank 0 also takes the BYTES items:
  `_extra_state`, common state) and runs torch.distributed.checkpoint's collective save on the
  workers' gloo group: DCP gathers the local plans on rank 0, checks that the chunks of every
  stacked key cover it exactly once, gives each rank its own ``__<rank>_*.distcp`` files and has
  rank 0 write ``.metadata``. Only rank 0 writes what follows the data (``common.pt``,
  ``metadata.json``, ``integrity.json``, the tracker), after the collective save has finished
  everywhere. (Imports torch.distributed.checkpoint: ``share_writers`` loads it only when used.)
"""
from __future__ import annotations

import warnings

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import WriteItemType

from ..formats.dcp_write import DcpWriter
from ..formats.megatron_dist_write import MegatronDistWriter


class SharedSave:
    """Mixin over a ``StreamingDcpSave`` writer: only the tensors in ``share`` are saved, with the
    other workers, in one collective DCP save; ``_item_name(item)`` names a write item's tensor."""

    def _init_share(self, share: set[str], rank: int, group) -> None:
        self._share, self._rank, self._group = set(share), rank, group   # read by _save (writer thread)

    def holds(self, name: str) -> bool:
        return name in self._share

    def _mine(self, item) -> bool:
        if item.type == WriteItemType.BYTE_IO:
            return self._rank == 0
        return self._item_name(item) in self._share

    def _save(self, planner, storage) -> None:
        try:
            planner._items = [it for it in planner._items if self._mine(it)]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.save({}, storage_writer=storage, planner=planner, process_group=self._group)
        except BaseException as e:  # noqa: BLE001 - handed to the engine's thread
            if isinstance(e, CheckpointException) and e.failures:
                e = next(iter(e.failures.values()))[0]
            self._failure = e
            self._handoff.fail(e)

    def write(self, name, tensor) -> None:
        if name in self._share:
            super().write(name, tensor)

    def close(self) -> None:
        if self._rank == 0:
            return super().close()
        self._start()
        self._handoff.close()
        self._thread.join()
        if self._failure is not None:
            raise self._failure


class SharedDistWriter(SharedSave, MegatronDistWriter):
    """The Megatron torch_dist writer interface, restricted to the logical tensors in ``share``."""

    def __init__(self, *args, share: set[str], rank: int, group, **kwargs):
        self._init_share(share, rank, group)
        super().__init__(*args, **kwargs)

    def _item_name(self, item) -> str:
        return self._by_index[(item.index.fqn, tuple(item.index.offset or ()))]


class SharedDcpWriter(SharedSave, DcpWriter):
    """The plain DCP writer, restricted to the tensors (stored keys) in ``share``."""

    def __init__(self, out_dir, metas, *, share: set[str], rank: int, group):
        self._init_share(share, rank, group)
        super().__init__(out_dir, metas)

    def _item_name(self, item) -> str:
        return item.index.fqn
