"""`ckptconv hf-to-megatron SRC DST`"""
from __future__ import annotations

import click

from ..engine.convert import hf_to_megatron
from ..formats.megatron import WRITERS
from ..formats.megatron_names import IMPLS
from .common import (debug_option, dtype_arg, dtype_option, emit, handle_errors, json_option,
                     launcher_option, nonfinite_option, overwrite_option, plan_text,
                     silent_rank, workers_option)


def parse_iteration(value: str) -> int | str:
    if value == "release":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("must be 'release' or an integer") from None


@click.command("hf-to-megatron")
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel degree.")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline-parallel degree.")
@click.option("--vpp", type=int, default=None, help="Virtual pipeline chunks per stage.")
@click.option("--decoder-first-pipeline-num-layers", "first_stage_layers", type=int, default=None,
              help="Layers on the first pipeline stage (uneven pipeline).")
@click.option("--decoder-last-pipeline-num-layers", "last_stage_layers", type=int, default=None,
              help="Layers on the last pipeline stage (uneven pipeline).")
@click.option("--ep", type=int, default=1, show_default=True,
              help="Expert-parallel degree (Mixture-of-Experts models; must divide the number of experts).")
@click.option("--etp", type=int, default=1, show_default=True,
              help="Expert tensor-parallel degree (must divide TP; Megatron-LM's default is 1).")
@click.option("--moe-grouped-gemm", is_flag=True,
              help="Per-rank output names experts the grouped-GEMM way (mlp.experts.linear_fc1.weight<j>).")
@click.option("--ckpt-format", type=click.Choice(sorted(WRITERS)), default="torch_dist", show_default=True,
              help="torch_dist: Megatron-Core distributed checkpoint (loads at any TP/PP); torch: per-rank files.")
@click.option("--transformer-impl", type=click.Choice(IMPLS), default="transformer_engine", show_default=True,
              help="Key space of the norms (TE fused names, or the local spec's).")
@dtype_option
@click.option("--make-vocab-size-divisible-by", "divisible_by", type=int, default=128, show_default=True)
@click.option("--iteration", default="release", show_default=True, help="'release' or an iteration number.")
@click.option("--cache-dir", type=click.Path(), default=None, help="Hugging Face hub cache for hf:// repo ids.")
@click.option("--download", is_flag=True,
              help="Download an hf://org/name repo that is not in the hub cache (off: cache only).")
@click.option("--dry-run", is_flag=True, help="Print the plan and checks; read and write no tensor.")
@overwrite_option
@nonfinite_option
@workers_option
@launcher_option
@json_option
@debug_option
@handle_errors
def command(src, dst, tp, pp, vpp, first_stage_layers, last_stage_layers, ep, etp, moe_grouped_gemm, ckpt_format, transformer_impl, dtype,
            divisible_by, iteration, cache_dir, download, dry_run, overwrite, allow_nonfinite, workers, launcher, as_json):
    """Convert a Hugging Face checkpoint (directory, or hf://org/name from the hub cache) to Megatron-Core."""
    summary = hf_to_megatron(src, dst, tp=tp, pp=pp, vpp=vpp, impl=transformer_impl, dtype=dtype_arg(dtype),
                             divisible_by=divisible_by, iteration=parse_iteration(iteration), ckpt_format=ckpt_format,
                             overwrite=overwrite, dry_run=dry_run, allow_nonfinite=allow_nonfinite,
                             show_progress=not as_json, workers=workers, launcher=launcher, cache_dir=cache_dir, download=download, first_stage_layers=first_stage_layers,
                             last_stage_layers=last_stage_layers, ep=ep, etp=etp, moe_grouped_gemm=moe_grouped_gemm)
    if silent_rank(launcher):
        return
    text = plan_text(summary) + ("" if dry_run else f"\nwrote {dst}")
    emit(summary, as_json, text)
