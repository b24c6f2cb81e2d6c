"""Megatron -> Megatron: change the on-disk format (torch <-> torch_dist) and/or TP/PP/VPP.

Only the parallel-layout layer is involved: any Megatron reader yields logical tensors (global
layer numbers, TE names, TP=1 layout), any Megatron writer splits them for the target layout.
The only tensor change is the vocab padding: when the target TP changes the padded vocab size
under Megatron-LM's rule (`pad_vocab_size`), embedding / output rows are re-padded (zero rows
appended, or padding rows beyond the true vocab dropped). Model weights only: optimizer, RNG
and scheduler state of a training checkpoint are not carried over (listed in the summary).

`plan_reshard` works from metadata alone (for --dry-run and checks); `reshard` executes it
tensor by tensor, one logical tensor in memory at a time.
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CkptError, LayoutError, UnknownFormat
from ..formats.atomic import atomic_output_dir
from ..formats.detect import detect_format
from ..formats.megatron import WRITERS, megatron_writer, open_megatron_reader
from ..formats.megatron_args import config_from_args
from ..formats.megatron_names import IMPLS
from ..plan.megatron_layout import MegatronLayout, pad_vocab_size
from ..plan.planner import TIED_COPY
from ..types import TensorMeta
from .megatron_as_hf import HF_ASSETS_DIR
from .memory import release_freed_memory
from .progress import progress

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
                 impl: str | None = None) -> ReshardPlan:
    src_args, old = reader.args, reader.layout
    pp = pp or old.pp
    vpp = (vpp if vpp is not None else old.vpp if pp == old.pp else None) or None
    vpp = None if vpp == 1 else vpp
    same = pp == old.pp and vpp == old.vpp
    layout = MegatronLayout(tp or old.tp, pp, old.num_layers, vpp, old.first_stage_layers if same else None,
                            old.last_stage_layers if same else None)
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
        family = config_from_args(reader.args, reader.meta.get("hf_config")).family
    except CkptError:
        family = None
    largest = max(m.nbytes for m in plan.metas)
    src_bytes = sum(m.nbytes for n, m in reader.tensors().items())
    return {
        "direction": "reshard", "source": str(src), "destination": str(dst),
        "source_format": reader.format, "format": f"megatron_{ckpt_format}", "family": family,
        "source_tp": reader.layout.tp, "source_pp": reader.layout.pp, "source_vpp": reader.layout.vpp,
        "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "layers_per_stage": lay.stage_layer_counts(),
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
                   f"layers {lay.num_layers} split over PP {lay.pp} x VPP {lay.vpp or 1} as {lay.stage_layer_counts()}"],
    }


def reshard(src: str | Path, dst: str | Path, *, ckpt_format: str = "torch_dist", tp: int | None = None,
            pp: int | None = None, vpp: int | None = None, impl: str | None = None,
            iteration: str | int = "latest", overwrite: bool = False, dry_run: bool = False,
            show_progress: bool = True) -> dict:
    """Rewrite a Megatron checkpoint (any reader format) in ``ckpt_format`` at TP/PP/VPP (default:
    the source's). Returns a summary; with ``dry_run`` nothing is read beyond metadata."""
    if ckpt_format not in WRITERS:
        raise UnknownFormat(f"unknown Megatron checkpoint format {ckpt_format!r}", fix=f"use one of {sorted(WRITERS)}")
    src, dst = Path(src), Path(dst)
    with open_megatron_reader(src, detect_format(src), iteration) as reader:
        plan = plan_reshard(reader, tp=tp, pp=pp, vpp=vpp, impl=impl)
        summary = _summary(reader, plan, src, dst, ckpt_format)
        if dry_run:
            return summary
        with atomic_output_dir(dst, sources=[src], overwrite=overwrite) as tmp:
            with megatron_writer(ckpt_format, tmp, plan.layout, plan.metas, args=plan.args, iteration=plan.iteration,
                                 impl=plan.impl, tie_copy=plan.tied, gated_mlp=bool(getattr(plan.args, "swiglu", True)),
                                 extra=dict(reader.meta)) as writer:
                for m in progress(plan.metas, desc="reshard", enabled=show_progress):
                    t = reader.read(m.name)
                    writer.write(m.name, _repad(t, m.shape[0]) if m.name in VOCAB_ROWS else t)
                    del t
                    release_freed_memory()
            assets = reader.root / HF_ASSETS_DIR
            if assets.is_dir():
                shutil.copytree(assets, tmp / HF_ASSETS_DIR)
    return summary
