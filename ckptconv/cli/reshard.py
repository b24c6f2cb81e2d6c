"""`ckptconv reshard SRC DST`"""
from __future__ import annotations

import click

from ..engine.reshard import reshard
from ..formats.megatron import WRITERS
from ..formats.megatron_names import IMPLS
from .common import debug_option, emit, handle_errors, json_option, plan_text


@click.command("reshard")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--ckpt-format", type=click.Choice(sorted(WRITERS)), default="torch_dist", show_default=True,
              help="Format to write: torch_dist (distributed checkpoint) or torch (per-rank files).")
@click.option("--tp", type=int, default=None, help="Target tensor-parallel degree [default: the source's].")
@click.option("--pp", type=int, default=None, help="Target pipeline-parallel degree [default: the source's].")
@click.option("--vpp", type=int, default=None, help="Target virtual pipeline chunks per stage.")
@click.option("--transformer-impl", type=click.Choice(IMPLS), default=None,
              help="Key space of the norms in per-rank output [default: the source model's].")
@click.option("--iteration", default="latest", show_default=True, help="'latest', 'release' or a number.")
@click.option("--dry-run", is_flag=True, help="Print the plan and checks; read and write no tensor.")
@click.option("--overwrite", is_flag=True, help="Replace DST (only after the new output is complete).")
@json_option
@debug_option
@handle_errors
def command(src, dst, ckpt_format, tp, pp, vpp, transformer_impl, iteration, dry_run, overwrite, as_json):
    """Rewrite a Megatron checkpoint in another format (torch <-> torch_dist) and/or TP/PP/VPP."""
    summary = reshard(src, dst, ckpt_format=ckpt_format, tp=tp, pp=pp, vpp=vpp, impl=transformer_impl,
                      iteration=iteration, overwrite=overwrite, dry_run=dry_run, show_progress=not as_json)
    text = (f"{summary['source_format']} TP={summary['source_tp']} PP={summary['source_pp']} "
            f"VPP={summary['source_vpp']} -> {summary['format']}\n" + plan_text(summary)
            + (f"\n  not carried over: {', '.join(summary['dropped_state'])}" if summary["dropped_state"] else "")
            + ("" if dry_run else f"\nwrote {dst}"))
    emit(summary, as_json, text)
