"""One DCP checkpoint (Megatron ``torch_dist`` or plain DCP) written collectively by several workers.

The writer plans every item and each worker writes only the items of its share (rank 0 also
takes the BYTES items: `_extra_state`, common state) into its own ``__<rank>_*.distcp`` files.
When every worker has closed (or aborted) its writer they exchange where their records landed (and
whether they failed) over their gloo group, and rank 0 writes ``.metadata`` for the whole plan, as torch's collective DCP save does
(the chunks of every stacked key cover it exactly once by construction: the shares partition
one plan). Only rank 0 writes what follows the data (``common.pt``, ``metadata.json``,
``integrity.json``, the tracker), after every worker's records are written; integrity.json takes
the SHA-256 each worker computed of its files while writing them (no file is read back).
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
        self._share, self._rank, self._group = set(share), rank, group
        self._stored, self._exchanged = {}, False

    def holds(self, name: str) -> bool:
        return name in self._share

    def _mine(self, item) -> bool:
        if item.is_bytes:
            return self._rank == 0
        return self._item_name(item) in self._share

    def _write_records(self):
        return self._storage.write_items([it for it in self._items if self._mine(it)], self._resolve_item,
                                         rank=self._rank)

    def _finish(self, stored) -> None:         # on the save thread: the exchange is close()'s
        self._stored = stored

    def _exchange(self, failed: bool) -> list:
        """Every worker's (record locations, file digests, failed?), gathered on rank 0 and
        broadcast back, once per save (whichever of close/abort comes first), on the main thread.
        The group is dropped afterwards: a process group still referenced when the interpreter
        shuts down (after destroy_process_group) made the process abort at exit now and then."""
        self._exchanged = True
        group, self._group = self._group, None
        everyone: list | None = [None] * dist.get_world_size(group) if self._rank == 0 else None
        mine = ({}, {}, True) if failed else (self._stored, self._storage.digests, False)
        dist.gather_object(mine, everyone, dst=0, group=group)
        box = [everyone]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def write(self, name, tensor) -> None:
        if name in self._share:
            super().write(name, tensor)

    def close(self) -> None:
        self._start()
        try:
            self._handoff.close()
            self._thread.join()
        except BaseException:
            self.abort()
            raise
        everyone = self._exchange(self._failure is not None)
        if self._failure is not None:
            raise self._failure
        if any(failed for _, _, failed in everyone):
            raise SaveAborted("another worker's save failed")
        if self._rank == 0:
            self._storage.write_metadata(self._items, {k: v for stored, _, _ in everyone for k, v in stored.items()})
            for _, digests, _ in everyone:      # every worker hashed its files as it wrote them:
                self._storage.digests.update(digests)   # integrity.json re-reads none of them
            self._commit()

    def abort(self) -> None:
        super().abort()
        if not self._exchanged:
            try:
                self._exchange(True)            # the other workers are waiting to hear it
            except Exception:  # noqa: BLE001 - a peer that is gone already knows
                pass


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
