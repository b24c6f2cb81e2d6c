"""Reshard with N workers: which output units form each worker's share, and writing one share.

* ``torch`` output: the unit of work is an output rank file ``(tp_rank, pp_rank, ep_rank)``
  (``plan.shares.megatron_file_shares``: whole pipeline stages kept together while there are at
  least as many stages as workers).
* ``torch_dist`` output: one DCP checkpoint written collectively by the workers, each its share
  of the logical tensors (``engine.shared_dcp``).
The processes themselves (local workers, torchrun ranks, the commit) are ``engine.workers``'.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..formats.megatron_args import gated_mlp
from ..formats.megatron_as_hf import HF_ASSETS_DIR
from ..plan.shares import megatron_file_shares, tensor_shares
from .memory import release_freed_memory
from .overlap import background_integrity_check, behind, finish_integrity_check
from .budget import DEFAULT_BUDGET, Budget
from .streams import reshard_stream
from .progress import progress
from .reshard_extra import carried_extra_state
from .reshard_manifest import ShareFingerprints
from .reshard_plan import VOCAB_ROWS, _repad
from .share_writers import megatron_share_writer


def shares(plan, ckpt_format: str, workers: int) -> list[set]:
    if ckpt_format == "torch":
        return megatron_file_shares(plan.layout, plan.metas, gated_mlp(plan.args), plan.tied, workers)
    return tensor_shares(plan.metas, workers)


def write_share(reader, plan, out: Path, ckpt_format: str, *, share=None, show_progress: bool = True,
                budget: Budget | None = None) -> int:
    """Write ``share``'s part of the plan into ``out`` (an engine.workers.Share; None: all of it);
    the lead worker also copies the HF assets. Returns the number of logical tensors read."""
    writer = megatron_share_writer(ckpt_format, out, plan.layout, plan.metas, share=share, args=plan.args,
                                   iteration=plan.iteration, impl=plan.impl, tie_copy=plan.tied,
                                   gated_mlp=gated_mlp(plan.args), extra=dict(reader.meta),
                                   extra_state=carried_extra_state(reader, plan, ckpt_format)[0])
    wanted = [m for m in plan.metas if share is None or writer.holds(m.name)]
    fingerprints = ShareFingerprints(reader, plan.padded_vocab[0])
    background_integrity_check(reader, share)
    budget, streams, src = budget or Budget(DEFAULT_BUDGET), [], reader.tensors()
    streaming = getattr(writer, "takes_row_streams", False)
    with writer:
        with behind(writer) as sink:
            for m in progress(wanted, desc="reshard", enabled=show_progress):
                targets = fingerprints.targets(m.name, src[m.name].shape, src[m.name].dtype)
                s = reshard_stream(m, src[m.name], reader, budget, targets, fingerprints.builder) \
                    if streaming and targets is not None else None
                if s is not None:       # rows read under the budget as the writer asks for them
                    sink.write(m.name, s)
                    streams.append(s)
                    continue
                with budget.io_lock:
                    t = reader.read(m.name)
                budget.note_whole(m.name, 2 * m.nbytes)
                sink.write(m.name, _repad(t, m.shape[0]) if m.name in VOCAB_ROWS else t)
                fingerprints.add(m.name, t)
                del t
                release_freed_memory()
        finish_integrity_check(reader)
    for s in streams:
        s.finish_targets()
    fingerprints.write(out, share)
    assets = reader.root / HF_ASSETS_DIR
    if (share is None or share.lead) and assets.is_dir():
        shutil.copytree(assets, out / HF_ASSETS_DIR)
    return len(wanted)
