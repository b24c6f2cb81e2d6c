"""`ckptconv megatron-to-hf SRC DST`"""
from __future__ import annotations

import click

from ..engine.convert import megatron_to_hf
from .common import (debug_option, dtype_arg, dtype_option, emit, handle_errors, json_option,
                     launcher_option, nonfinite_option, overwrite_option, plan_text,
                     silent_rank, workers_option)


@click.command("megatron-to-hf")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--iteration", default="latest", show_default=True, help="'latest', 'release' or a number.")
@click.option("--hf-config", type=click.Path(exists=True), default=None,
              help="HF config.json (or its directory) when the checkpoint carries none.")
@dtype_option
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan and checks; read and write no tensor.")
@overwrite_option
@nonfinite_option
@workers_option
@launcher_option
@json_option
@debug_option
@handle_errors
def command(src, dst, iteration, hf_config, dtype, max_shard_size, dry_run, overwrite, allow_nonfinite, workers, launcher, as_json):
    """Convert a Megatron-Core checkpoint (per-rank torch or torch_dist, any TP/PP/VPP) to Hugging Face safetensors."""
    summary = megatron_to_hf(src, dst, iteration=iteration, hf_config=hf_config, dtype=dtype_arg(dtype),
                             max_shard_size=max_shard_size, overwrite=overwrite, dry_run=dry_run,
                             allow_nonfinite=allow_nonfinite, show_progress=not as_json, workers=workers, launcher=launcher)
    if silent_rank(launcher):
        return
    text = plan_text(summary) + ("" if dry_run else f"\nwrote {dst}")
    emit(summary, as_json, text)
