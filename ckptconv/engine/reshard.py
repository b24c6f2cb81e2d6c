"""Megatron -> Megatron: change the on-disk format (torch <-> torch_dist) and/or TP/PP/VPP.

Only the parallel-layout layer is involved: any Megatron reader yields logical tensors (global
layer numbers, TE names, TP=1 layout), any Megatron writer splits them for the target layout.
The only tensor change is the vocab padding: when the target TP changes the padded vocab size
under Megatron-LM's rule (`pad_vocab_size`), embedding / output rows are re-padded (zero rows
appended, or padding rows beyond the true vocab dropped). Model weights only: optimizer, RNG
and scheduler state of a training checkpoint are not carried over (listed in the summary).

`plan_reshard` works from metadata alone (for --dry-run and checks); `reshard` executes it
tensor by tensor, one logical tensor in memory at a time, in this process or split over N worker
processes / torchrun ranks (`reshard_workers`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CkptError, LayoutError, UnknownFormat
from ..formats.atomic import atomic_output_dir
from ..formats.detect import detect_format
from ..formats.megatron import WRITERS, open_megatron_reader
from ..formats.megatron_args import config_from_args
from ..formats.megatron_names import IMPLS
from ..plan.megatron_layout import MegatronLayout, pad_vocab_size
from ..plan.planner import TIED_COPY
from ..types import TensorMeta
from ..verify.manifest import MANIFEST_NAME
from .reshard_workers import ReshardJob, check_workers, env_rank, run_local, run_torchrun, shares, write_share

VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class ReshardPlan:
    layout: MegatronLayout
    args: argparse.Namespace
    metas: list[TensorMeta]             # what the target gets, in writing order
    padded_vocab: tuple[int, int]       # (source, target) rows of the vocab tensors
    impl: str
    tied: bool
    iteration: int | str
    ignored: list[str] = field(default_factory=list)


def plan_reshard(reader, *, tp: int | None = None, pp: int | None = None, vpp: int | None = None,
                 impl: str | None = None, first_stage_layers: int | None = None,
                 last_stage_layers: int | None = None, ep: int | None = None, etp: int | None = None) -> ReshardPlan:
    """The target layout, args and tensor list, from metadata alone. Uneven first/last pipeline
    stages are kept when PP and VPP stay the same and none are given."""
    src_args, old = reader.args, reader.layout
    pp = pp or old.pp
    vpp = (vpp if vpp is not None else old.vpp if pp == old.pp else None) or None
    vpp = None if vpp == 1 else vpp
    same = pp == old.pp and vpp == old.vpp
    if first_stage_layers is None and last_stage_layers is None and same:
        first_stage_layers, last_stage_layers = old.first_stage_layers, old.last_stage_layers
    layout = MegatronLayout(tp or old.tp, pp, old.num_layers, vpp, first_stage_layers, last_stage_layers,
                            old.num_experts, ep or old.ep, etp or old.etp)
    metas = reader.tensors()
    tied = not getattr(src_args, "untie_embeddings_and_output_weights", TIED_COPY in metas)
    ignored = [TIED_COPY] if tied and TIED_COPY in metas else []
    old_padded = metas["embedding.word_embeddings.weight"].shape[0] if "embedding.word_embeddings.weight" in metas \
        else int(getattr(src_args, "padded_vocab_size", 0) or 0)
    new_padded = old_padded
    if layout.tp != old.tp:
        vocab = getattr(src_args, "vocab_size", None) or (reader.meta.get("hf_config") or {}).get("vocab_size")
        divisible = int(getattr(src_args, "make_vocab_size_divisible_by", 128) or 128)
        new_padded = pad_vocab_size(int(vocab or old_padded), divisible, layout.tp)
    _check_layout(src_args, layout, new_padded)
    out = []
    for name, m in metas.items():
        if name in ignored:
            continue
        shape = (new_padded, *m.shape[1:]) if name in VOCAB_ROWS else m.shape
        out.append(TensorMeta(name, tuple(shape), m.dtype))
    args = argparse.Namespace(**vars(src_args))
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = layout.tp, layout.pp
    args.virtual_pipeline_model_parallel_size = layout.vpp
    args.num_layers_per_virtual_pipeline_stage = layout.num_layers // (layout.pp * layout.vpp) if layout.vpp else None
    args.decoder_first_pipeline_num_layers = layout.first_stage_layers
    args.decoder_last_pipeline_num_layers = layout.last_stage_layers
    args.padded_vocab_size = new_padded
    if layout.num_experts:
        args.expert_model_parallel_size, args.expert_tensor_parallel_size = layout.ep, layout.etp
    if impl is None:
        impl = reader.impl if reader.format == "megatron_torch" else getattr(src_args, "transformer_impl", reader.impl)
    if impl not in IMPLS:
        raise LayoutError(f"transformer_impl {impl!r} is not one of {IMPLS}", fix="pass --transformer-impl")
    args.transformer_impl = impl
    iteration = "release" if reader.iter_dir.name == "release" else int(reader.iteration or 0)
    return ReshardPlan(layout, args, out, (old_padded, new_padded), impl, tied, iteration, ignored)


def _check_layout(args, layout: MegatronLayout, padded: int) -> None:
    layout.check()
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    ffn = int(getattr(args, "ffn_hidden_size", 0) or 0)
    for what, n in (("num_query_groups", groups), ("num_attention_heads", heads), ("ffn_hidden_size", ffn),
                    ("padded vocab", padded)):
        if n % layout.tp:
            raise LayoutError(f"{what}={n} is not divisible by TP={layout.tp}", path="args",
                              fix=f"choose a TP that divides {n}")


def _repad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _summary(reader, plan: ReshardPlan, src: Path, dst: Path, ckpt_format: str) -> dict:
    lay = plan.layout
    try:
        family = config_from_args(reader.args, reader.meta.get("hf_config"), check_fields=False).family
    except CkptError:
        family = None
    largest = max(m.nbytes for m in plan.metas)
    src_bytes = sum(m.nbytes for n, m in reader.tensors().items())
    return {
        "direction": "reshard", "source": str(src), "destination": str(dst),
        "source_format": reader.format, "format": f"megatron_{ckpt_format}", "family": family,
        "source_tp": reader.layout.tp, "source_pp": reader.layout.pp, "source_vpp": reader.layout.vpp,
        "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, **_expert_summary(reader.layout, lay), "layers_per_stage": lay.stage_layer_counts(),
        "vocab_size": getattr(reader.args, "vocab_size", None), "source_padded_vocab_size": plan.padded_vocab[0],
        "padded_vocab_size": plan.padded_vocab[1], "transformer_impl": plan.impl, "iteration": plan.iteration,
        "tensors_read": len(plan.metas), "bytes_read": src_bytes,
        "tensors_written": len(plan.metas), "bytes_written": sum(m.nbytes for m in plan.metas),
        "largest_tensor_bytes": largest, "memory_forecast_bytes": 3 * largest,
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
            workers: int = 1, launcher: str = "local", show_progress: bool = True) -> dict:
    """Rewrite a Megatron checkpoint (any reader format) in ``ckpt_format`` at TP/PP/VPP (default:
    the source's), optionally with uneven first/last pipeline stages. ``workers`` > 1 writes the
    output with that many local processes (see `reshard_workers`). Returns a summary; with
    ``dry_run`` nothing is read beyond metadata. ``launcher="torchrun"``: this process is one rank
    of a torchrun job and writes its share (``workers`` is then the job's world size)."""
    if ckpt_format not in WRITERS:
        raise UnknownFormat(f"unknown Megatron checkpoint format {ckpt_format!r}", fix=f"use one of {sorted(WRITERS)}")
    check_workers(workers)
    src, dst = Path(src), Path(dst)
    if launcher == "torchrun":
        workers = env_rank()[1]
    kw = dict(tp=tp, pp=pp, vpp=vpp, impl=impl, first_stage_layers=first_stage_layers,
              last_stage_layers=last_stage_layers, ep=ep, etp=etp)
    with open_megatron_reader(src, detect_format(src), iteration) as reader:
        plan = plan_reshard(reader, **kw)
        summary = _summary(reader, plan, src, dst, ckpt_format)
        summary["workers"] = workers
        summary["worker_shares"] = _share_text(plan, ckpt_format, workers)
        if dry_run:
            return summary
        job = ReshardJob(str(src), iteration, ckpt_format, kw, show_progress)
        if launcher != "torchrun":
            with atomic_output_dir(dst, sources=[src], overwrite=overwrite) as tmp:
                if workers == 1:
                    write_share(reader, plan, tmp, ckpt_format, show_progress=show_progress)
                else:
                    run_local(job, tmp, workers)
            summary["manifest"] = str(dst / MANIFEST_NAME) if (dst / MANIFEST_NAME).is_file() else None
            return summary
    run_torchrun(job, dst, overwrite=overwrite)
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
