"""`ckptconv reshard SRC DST`"""
from __future__ import annotations

import click

from ..engine.reshard import reshard
from ..formats.megatron import WRITERS
from ..formats.megatron_names import IMPLS
from .common import (debug_option, emit, handle_errors, json_option, launcher_option, overwrite_option, plan_text,
                     silent_rank, workers_option)


@click.command("reshard")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--ckpt-format", type=click.Choice(sorted(WRITERS)), default="torch_dist", show_default=True,
              help="Format to write: torch_dist (distributed checkpoint) or torch (per-rank files).")
@click.option("--tp", type=int, default=None, help="Target tensor-parallel degree [default: the source's].")
@click.option("--pp", type=int, default=None, help="Target pipeline-parallel degree [default: the source's].")
@click.option("--vpp", type=int, default=None, help="Target virtual pipeline chunks per stage.")
@click.option("--decoder-first-pipeline-num-layers", "first_stage_layers", type=int, default=None,
              help="Layers on the first pipeline stage (uneven pipeline) [default: the source's if PP/VPP "
                   "are unchanged, else even].")
@click.option("--decoder-last-pipeline-num-layers", "last_stage_layers", type=int, default=None,
              help="Layers on the last pipeline stage (uneven pipeline).")
@click.option("--ep", type=int, default=None,
              help="Target expert-parallel degree of a Mixture-of-Experts model [default: the source's].")
@click.option("--etp", type=int, default=None,
              help="Target expert tensor-parallel degree (must divide TP) [default: the source's].")
@click.option("--transformer-impl", type=click.Choice(IMPLS), default=None,
              help="Key space of the norms in per-rank output [default: the source model's].")
@click.option("--iteration", default="latest", show_default=True, help="'latest', 'release' or a number.")
@click.option("--dry-run", is_flag=True, help="Print the plan and checks; read and write no tensor.")
@overwrite_option
@workers_option
@launcher_option
@json_option
@debug_option
@handle_errors
def command(src, dst, ckpt_format, tp, pp, vpp, first_stage_layers, last_stage_layers, ep, etp, transformer_impl,
            iteration, dry_run, overwrite, workers, launcher, as_json):
    """Rewrite a Megatron checkpoint in another format (torch <-> torch_dist) and/or TP/PP/VPP."""
    summary = reshard(src, dst, ckpt_format=ckpt_format, tp=tp, pp=pp, vpp=vpp, impl=transformer_impl,
                      first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers,
                      ep=ep, etp=etp, iteration=iteration, overwrite=overwrite, dry_run=dry_run, workers=workers,
                      launcher=launcher, show_progress=not as_json)
    if silent_rank(launcher):
        return
    experts = (f" EP={summary['source_ep']} ETP={summary['source_etp']} ({summary['num_experts']} experts)"
               if summary.get("num_experts") else "")
    text = (f"{summary['source_format']} TP={summary['source_tp']} PP={summary['source_pp']} "
            f"VPP={summary['source_vpp']}{experts} -> {summary['format']}\n" + plan_text(summary)
            + (f"\n  not carried over: {', '.join(summary['dropped_state'])}" if summary["dropped_state"] else "")
            + (f"\n  _extra_state carried: {summary['extra_state_carried']} (module, rank) entries"
               if summary.get("extra_state_carried") else "")
            + "".join(f"\n  _extra_state reset: {k} ({why})" for k, why in summary.get("extra_state_dropped", {}).items())
            + (f"\n  workers: {summary['workers']}: " + "; ".join(summary["worker_shares"])
               if summary["workers"] > 1 else "")
            + ("" if dry_run else f"\nwrote {dst}"))
    emit(summary, as_json, text)
