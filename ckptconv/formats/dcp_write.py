"""A plain torch DCP checkpoint (what `dcp.save(state_dict)` writes), streamed: Writer.

    DST/.metadata        torch.distributed.checkpoint Metadata (as torch's FileSystemWriter writes it)
    DST/__0_K.distcp     one record file per tensor
    DST/config.json      the HF config (+ tokenizer files): DCP loaders ignore them, ckptconv reads them

Each tensor is one whole chunk under its key, so any world size loads it: `dcp.load` reads
the part of each chunk that overlaps a rank's shard (FSDP2, TP, ...). The streaming is the
torch_dist writer's (``megatron_dist_write``): a save thread writes the planned records in order,
and ``write(name, t)`` hands the tensor to it through a one-slot rendezvous, so at most the tensor
being serialised and the one being produced are alive. torch's DCP package is not imported.
"""
from __future__ import annotations

from pathlib import Path

from ..types import TensorMeta
from .dcp_metadata_write import tensor_item
from .megatron_dist_write import StreamingDcpSave


class DcpWriter(StreamingDcpSave):
    def __init__(self, out_dir: Path, metas: list[TensorMeta]):
        self.out_dir = Path(out_dir)
        self._metas = {m.name: m for m in metas}
        items = [tensor_item(m.name, (0,) * len(m.shape), m.shape, m.shape, m.dtype) for m in metas]
        self._init_save(items, lambda item: self._handoff.take(item.fqn), self.out_dir)
