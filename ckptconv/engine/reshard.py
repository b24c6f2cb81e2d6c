"""Megatron -> Megatron: change the on-disk format (torch <-> torch_dist) and/or TP/PP/VPP.

Only the parallel-layout layer is involved: any Megatron reader yields logical tensors (global
layer numbers, TE names, TP=1 layout), any Megatron writer splits them for the target layout.
The only tensor change is the vocab padding: when the target TP changes the padded vocab size
under Megatron-LM's rule (`pad_vocab_size`), embedding / output rows are re-padded (zero rows
appended, or padding rows beyond the true vocab dropped). Model weights and the modules'
`_extra_state` (``reshard_extra``: carried where the owner rank is unambiguous, else listed as
dropped); optimizer, RNG and scheduler state of a training checkpoint are not carried over
(listed in the summary).

`plan_reshard` works from metadata alone (for --dry-run and checks); `reshard` executes it
tensor by tensor, one logical tensor in memory at a time, in this process or split over N worker
processes / torchrun ranks (`engine.workers`, shares in `reshard_workers`); the plan itself is in `reshard_plan`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CkptError, UnknownFormat
from ..formats.detect import detect_format
from ..formats.megatron import WRITERS, open_megatron_reader
from ..formats.megatron_args import config_from_args
from ..plan.megatron_layout import MegatronLayout
from ..verify.manifest import MANIFEST_NAME
from ..plan.forecast import pieces_written
from ..plan.memory import memory_forecast
from .forecast_summary import time_forecast
from .reshard_extra import carried_extra_state
from .reshard_manifest import ShareFingerprints
from .reshard_plan import ReshardPlan, plan_reshard
from .reshard_workers import shares, write_share
from .budget import DEFAULT_BUDGET, Budget
from .workers import Share, WorkerJob, check_workers, fan_out, output_dir, plan_workers


def _by_rows(reader, plan: ReshardPlan) -> list[bool]:
    """Per output tensor: whether the reshard streams it by rows (``reshard_workers.write_share``:
    a row-wise op and the same row width; else it is read whole)."""
    fingerprints, src = ShareFingerprints(reader, plan.padded_vocab[0]), reader.tensors()
    return [bool(m.shape) and tuple(m.shape[1:]) == tuple(src[m.name].shape[1:])
            and fingerprints.targets(m.name, src[m.name].shape, src[m.name].dtype) is not None for m in plan.metas]


def _summary(reader, plan: ReshardPlan, src: Path, dst: Path, ckpt_format: str, budget_bytes: int) -> dict:
    lay = plan.layout
    try:
        family = config_from_args(reader.args, reader.meta.get("hf_config"), check_fields=False).family
    except CkptError:
        family = None
    largest = max(m.nbytes for m in plan.metas)
    src_bytes = sum(m.nbytes for n, m in reader.tensors().items())
    by_rows = _by_rows(reader, plan)
    return {
        "direction": "reshard", "source": str(src), "destination": str(dst),
        "source_format": reader.format, "format": f"megatron_{ckpt_format}", "family": family,
        "source_tp": reader.layout.tp, "source_pp": reader.layout.pp, "source_vpp": reader.layout.vpp,
        "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, **_expert_summary(reader.layout, lay), "layers_per_stage": lay.stage_layer_counts(),
        "vocab_size": getattr(reader.args, "vocab_size", None), "source_padded_vocab_size": plan.padded_vocab[0],
        "padded_vocab_size": plan.padded_vocab[1], "transformer_impl": plan.impl, "iteration": plan.iteration,
        "tensors_read": len(plan.metas), "bytes_read": src_bytes,
        "tensors_written": len(plan.metas), "bytes_written": sum(m.nbytes for m in plan.metas),
        "largest_tensor_bytes": largest,
        **memory_forecast(budget_bytes, [m.nbytes for m, r in zip(plan.metas, by_rows) if r],
                          [m.nbytes for m, r in zip(plan.metas, by_rows) if not r]),
        "ignored_source_tensors": plan.ignored,
        "dropped_state": sorted(k for k in reader.common if k not in ("args", "ckptconv", "checkpoint_version",
                                                                      "iteration") and not k.startswith("model")),
        "checks": [f"num_query_groups, num_attention_heads, ffn_hidden_size % TP {lay.tp} == 0",
                   f"padded vocab {plan.padded_vocab[1]} % TP {lay.tp} == 0",
                   f"layers {lay.num_layers} split over PP {lay.pp} x VPP {lay.vpp or 1} as "
                   f"{lay.stage_layer_counts()}"],
    }


def reshard(src: str | Path, dst: str | Path, *, ckpt_format: str = "torch_dist", tp: int | None = None,
            pp: int | None = None, vpp: int | None = None, impl: str | None = None,
            first_stage_layers: int | None = None, last_stage_layers: int | None = None,
            ep: int | None = None, etp: int | None = None, iteration: str | int = "latest", overwrite: bool = False, dry_run: bool = False,
            workers: int | str = 1, launcher: str = "local", show_progress: bool = True,
            share: Share | None = None, memory_budget: int = DEFAULT_BUDGET) -> dict:
    """Rewrite a Megatron checkpoint (any reader format) in ``ckpt_format`` at TP/PP/VPP (default:
    the source's), optionally with uneven first/last pipeline stages. ``workers`` > 1 writes the
    output with that many local processes (``auto``: see engine.workers.resolve_workers). Returns a
    summary; with ``dry_run`` nothing is read beyond metadata. ``launcher="torchrun"``: this process
    is one rank of a torchrun job and writes its share (``workers`` is then the job's world size);
    ``share``: as a worker, write only that share into ``dst`` (the coordinator's directory)."""
    if ckpt_format not in WRITERS:
        raise UnknownFormat(f"unknown Megatron checkpoint format {ckpt_format!r}", fix=f"use one of {sorted(WRITERS)}")
    check_workers(workers)
    src, dst = Path(src), Path(dst)
    kw = dict(tp=tp, pp=pp, vpp=vpp, impl=impl, first_stage_layers=first_stage_layers,
              last_stage_layers=last_stage_layers, ep=ep, etp=etp)
    with open_megatron_reader(src, detect_format(src), iteration) as reader:
        plan = plan_reshard(reader, **kw)
        summary = _summary(reader, plan, src, dst, ckpt_format, memory_budget)
        workers = plan_workers(summary, workers, launcher, share=share,
                               units=len(plan.layout.rank_files()) if ckpt_format == "torch" else len(plan.metas))
        carried, dropped = carried_extra_state(reader, plan, ckpt_format)
        summary["extra_state_carried"] = sum(len(v) for v in carried.values())
        summary["extra_state_dropped"] = dropped
        summary["worker_shares"] = _share_text(plan, ckpt_format, workers)
        if dry_run:
            return {**summary, **time_forecast("reshard", summary, dst, source=src, workers=workers,
                                               pieces=pieces_written([m.name for m in plan.metas], plan.layout))}
        job = WorkerJob.of(reshard, src, ckpt_format=ckpt_format, iteration=iteration, show_progress=show_progress,
                           memory_budget=memory_budget, **kw)
        if not fan_out(job, dst, workers, sources=[src], overwrite=overwrite, launcher=launcher, share=share):
            budget = Budget(memory_budget)
            with output_dir(dst, sources=[src], overwrite=overwrite, share=share) as tmp:
                write_share(reader, plan, tmp, ckpt_format, share=share, show_progress=show_progress, budget=budget)
            summary.update(budget.summary())
        if share is None:
            summary["manifest"] = str(dst / MANIFEST_NAME) if (dst / MANIFEST_NAME).is_file() else None
    return summary


def _expert_summary(old: MegatronLayout, new: MegatronLayout) -> dict:
    if not new.num_experts:
        return {}
    return {"num_experts": new.num_experts, "source_ep": old.ep, "source_etp": old.etp, "ep": new.ep, "etp": new.etp}


def _share_text(plan: ReshardPlan, ckpt_format: str, workers: int) -> list[str]:
    out = []
    for part in shares(plan, ckpt_format, workers):
        if ckpt_format == "torch":
            out.append(" ".join(f"tp{t}pp{p}" + (f"ep{e}" if plan.layout.ep > 1 else "")
                                for t, p, e in sorted(part, key=lambda k: (k[1], k[2], k[0]))) or "-")
        else:
            out.append(f"{len(part)} tensors, {sum(m.nbytes for m in plan.metas if m.name in part)} bytes")
    return out
