"""The plan of a Megatron -> Megatron reshard, from metadata alone (for --dry-run, checks and
every worker): target layout, args and tensor list, and the vocab re-padding of a tensor."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from ..errors import LayoutError
from ..formats.megatron_names import IMPLS
from ..plan.megatron_layout import MegatronLayout, pad_vocab_size
from ..plan.planner import TIED_COPY
from ..types import TensorMeta


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
