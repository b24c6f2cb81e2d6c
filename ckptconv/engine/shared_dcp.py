"""One DCP checkpoint (Megatron ``torch_dist`` or plain DCP) written collectively by several workers.

The writer plans every item and each worker writes only the items of its share (rank 0 also
takes the BYTES items: `_extra_state`, common state) into its own ``__<rank>_*.distcp`` files.
The workers then exchange where their records landed (and whether they failed) over their gloo
group, and rank 0 writes ``.metadata`` for the whole plan, as torch's collective DCP save does
(the chunks of every stacked key cover it exactly once by construction: the shares partition
one plan). Only rank 0 writes what follows the data (``common.pt``, ``metadata.json``,
``integrity.json``, the tracker), after every worker's records are written.
"""
from __future__ import annotations

import torch.distributed as dist

from ..formats.dcp_write import DcpWriter
from ..formats.megatron_dist_write import MegatronDistWriter, SaveAborted


class SharedSave:
    """Mixin over a ``StreamingDcpSave`` writer: only the tensors in ``share`` are saved, then the
    workers' record locations are gathered for rank 0's `.metadata`; ``_item_name(item)`` names
    a planned item's tensor."""

    def _init_share(self, share: set[str], rank: int, group) -> None:
        self._share, self._rank, self._group = set(share), rank, group   # read by _save (writer thread)

    def holds(self, name: str) -> bool:
        return name in self._share

    def _mine(self, item) -> bool:
        if item.is_bytes:
            return self._rank == 0
        return self._item_name(item) in self._share

    def _write_records(self):
        try:
            stored, failed = self._storage.write_items([it for it in self._items if self._mine(it)],
                                                       self._resolve_item, rank=self._rank), None
        except BaseException as e:  # noqa: BLE001 - every worker joins the exchange below, then raises
            stored, failed = {}, e
        everyone: list = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(everyone, (stored, failed is not None), group=self._group)
        if failed is not None:
            raise failed
        if any(f for _, f in everyone):
            raise SaveAborted("another worker's save failed")
        return {k: v for s, _ in everyone for k, v in s.items()}

    def _finish(self, stored) -> None:
        if self._rank == 0:
            super()._finish(stored)

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
        return self._by_index[item.key]


class SharedDcpWriter(SharedSave, DcpWriter):
    """The plain DCP writer, restricted to the tensors (stored keys) in ``share``."""

    def __init__(self, out_dir, metas, *, share: set[str], rank: int, group):
        self._init_share(share, rank, group)
        super().__init__(out_dir, metas)

    def _item_name(self, item) -> str:
        return item.fqn
