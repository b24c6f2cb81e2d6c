"""`ckptconv dcp-to-megatron SRC DST --tp T --pp P`"""
from __future__ import annotations

import click

from ..engine.dcp_convert import dcp_to_megatron
from ..formats.megatron import WRITERS
from ..formats.megatron_names import IMPLS
from .common import (debug_option, dtype_arg, dtype_option, emit, handle_errors, json_option,
                     nonfinite_option, overwrite_option, plan_text,
                     launcher_option, silent_rank, workers_option)
from .dcp_to_hf import dcp_text, hf_config_option, step_option
from .hf_to_megatron import parse_iteration


@click.command("dcp-to-megatron")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel degree.")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline-parallel degree.")
@click.option("--vpp", type=int, default=None, help="Virtual pipeline chunks per stage.")
@click.option("--ckpt-format", type=click.Choice(sorted(WRITERS)), default="torch_dist", show_default=True,
              help="torch_dist: Megatron-Core distributed checkpoint (loads at any TP/PP); torch: per-rank files.")
@step_option
@hf_config_option
@click.option("--transformer-impl", type=click.Choice(IMPLS), default="transformer_engine", show_default=True)
@dtype_option
@click.option("--make-vocab-size-divisible-by", "divisible_by", type=int, default=128, show_default=True)
@click.option("--iteration", default="release", show_default=True, help="'release' or an iteration number.")
@click.option("--dry-run", is_flag=True, help="Print the plan and checks; read and write no tensor.")
@overwrite_option
@nonfinite_option
@workers_option
@launcher_option
@json_option
@debug_option
@handle_errors
def command(src, dst, tp, pp, vpp, ckpt_format, step, hf_config, transformer_impl, dtype, divisible_by, iteration,
            dry_run, overwrite, allow_nonfinite, workers, launcher, as_json):
    """Convert a torch DCP training checkpoint (FSDP2, accelerate, torchtitan) to Megatron-Core."""
    summary = dcp_to_megatron(src, dst, step=step, hf_config=hf_config, tp=tp, pp=pp, vpp=vpp, impl=transformer_impl,
                              dtype=dtype_arg(dtype), divisible_by=divisible_by, iteration=parse_iteration(iteration),
                              ckpt_format=ckpt_format, overwrite=overwrite, dry_run=dry_run,
                              allow_nonfinite=allow_nonfinite, show_progress=not as_json, workers=workers, launcher=launcher)
    if silent_rank(launcher):
        return
    emit(summary, as_json, dcp_text(summary) + "\n" + plan_text(summary) + ("" if dry_run else f"\nwrote {dst}"))
