"""The writer of one worker's share of the output (``share``: an engine.workers.Share; None or a
world of 1: the whole output). Which units form a share is ``plan.shares``' arithmetic.

* per-rank Megatron ``torch``: the writer's ``files`` filter (a share is a set of rank files).
* ``torch_dist`` / plain DCP: a collective DCP save of the share's tensors (``shared_dcp``).
* Hugging Face safetensors: the writer's ``files`` filter (a share is a set of shard files); only
  the lead worker writes the index.
A share's writer has ``holds(name)``: whether this share writes (part of) ``name``.
"""
from __future__ import annotations

from pathlib import Path

from ..formats.hf_write import HFWriter
from ..formats.megatron import megatron_writer
from ..plan.output_shards import plan_shards, shard_file_names
from ..plan.shares import file_shares, megatron_file_shares, tensor_shares


def _alone(share) -> bool:
    return share is None or share.world == 1


def megatron_share_writer(ckpt_format: str, out: Path, layout, metas, *, share, gated_mlp: bool, tie_copy: bool,
                          **kwargs):
    kwargs.update(gated_mlp=gated_mlp, tie_copy=tie_copy)
    if _alone(share):
        return megatron_writer(ckpt_format, out, layout, metas, **kwargs)
    if ckpt_format == "torch":
        files = megatron_file_shares(layout, metas, gated_mlp, tie_copy, share.world)[share.rank]
        return megatron_writer(ckpt_format, out, layout, metas, files=files, **kwargs)
    from .shared_dcp import SharedDistWriter        # torch.distributed: only when used
    names = tensor_shares(metas, share.world)[share.rank]
    return SharedDistWriter(out, layout, metas, share=names, rank=share.rank, group=share.group, **kwargs)


def hf_files(metas, max_shard_size: int) -> dict[str, int]:
    """Shard file name -> bytes of the safetensors output (HFWriter's plan)."""
    groups = plan_shards([(m.name, m.nbytes) for m in metas], max_shard_size) or [[]]
    size = {m.name: m.nbytes for m in metas}
    return {f: sum(size[n] for n in g) for f, g in zip(shard_file_names(len(groups)), groups)}


def hf_share_writer(out: Path, metas, max_shard_size: int, *, share) -> HFWriter:
    if _alone(share):
        return HFWriter(out, metas, max_shard_size)
    files = file_shares(hf_files(metas, max_shard_size), share.world)[share.rank]
    return HFWriter(out, metas, max_shard_size, files=files, index=share.lead)


def dcp_share_writer(out: Path, metas, *, share):
    """The plain DCP writer (hf-to-dcp) for ``share``: its share of the stored keys."""
    if _alone(share):
        from ..formats.dcp_write import DcpWriter
        return DcpWriter(out, metas)
    from .shared_dcp import SharedDcpWriter
    names = tensor_shares(metas, share.world)[share.rank]
    return SharedDcpWriter(out, metas, share=names, rank=share.rank, group=share.group)
