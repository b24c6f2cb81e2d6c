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

from pathlib import Path

from ..types import TensorMeta
from .megatron_dist_write import StreamingDcpSave, _item
from torch.distributed.checkpoint.planner import WriteItemType


class DcpWriter(StreamingDcpSave):
    def __init__(self, out_dir: Path, metas: list[TensorMeta]):
        self.out_dir = Path(out_dir)
        self._metas = {m.name: m for m in metas}
        items = [_item(m.name, (0,) * len(m.shape), m.shape, m.shape, m.dtype, WriteItemType.TENSOR) for m in metas]
        self._init_save(items, lambda item: self._handoff.take(item.index.fqn), self.out_dir)
