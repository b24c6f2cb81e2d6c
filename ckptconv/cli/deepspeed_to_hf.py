"""`ckptconv deepspeed-to-hf SRC DST`"""
from __future__ import annotations

import click

from ..engine.deepspeed_convert import deepspeed_to_hf
from ..formats.deepspeed_zero import WEIGHTS
from .common import (debug_option, dtype_arg, dtype_option, emit, handle_errors, human_bytes,
                     json_option, nonfinite_option, overwrite_option,
                     launcher_option, silent_rank, workers_option)


def deepspeed_text(s: dict) -> str:
    what = f"stage {s['stage']}" if s.get("stage") is not None else s.get("deepspeed_layout")
    if s.get("optimizer"):
        what += f" ({s['optimizer']}, {s['world_size']} data-parallel ranks)"
    if s.get("direction") == "megatron_to_hf":
        what += f", Megatron-DeepSpeed TP={s['tp']} PP={s['pp']}, vocab {s['padded_vocab_size']} -> {s['vocab_size']}"
    weights = s["weights"] + (f" ({s['weights_from']})" if s.get("weights_from") else "")
    lines = [f"deepspeed -> hf: tag {s['tag']}, {what}, weights {weights}",
             f"  write {s['tensors_written']} tensors, {human_bytes(s['bytes_written'])}"]
    if s.get("dropped_aliases"):
        lines.append(f"  tied copies not written (config ties them): {', '.join(s['dropped_aliases'])}")
    return "\n".join(lines)


@click.command("deepspeed-to-hf")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@click.option("--tag", default=None, help="Checkpoint tag (default: the one named in 'latest').")
@click.option("--weights", type=click.Choice(WEIGHTS), default="master", show_default=True,
              help="master: fp32 masters from the optimizer partitions; module: the engine's 16-bit module weights "
                   "(stage 3 saves none: the masters rounded to the engine's dtype).")
@click.option("--hf-config", type=click.Path(exists=True), default=None,
              help="HF config.json (or its directory); default: the config.json next to the checkpoint.")
@dtype_option
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print what would be written; read and write no tensor.")
@overwrite_option
@nonfinite_option
@workers_option
@launcher_option
@json_option
@debug_option
@handle_errors
def command(src, dst, tag, weights, hf_config, dtype, max_shard_size, dry_run, overwrite, allow_nonfinite, workers, launcher, as_json):
    """Consolidate a DeepSpeed checkpoint (ZeRO 1/2/3, BF16_Optimizer, Megatron-DeepSpeed) into HF safetensors."""
    summary = deepspeed_to_hf(src, dst, tag=tag, weights=weights, hf_config=hf_config, dtype=dtype_arg(dtype),
                              max_shard_size=max_shard_size, overwrite=overwrite, dry_run=dry_run,
                              allow_nonfinite=allow_nonfinite, show_progress=not as_json, workers=workers, launcher=launcher)
    if silent_rank(launcher):
        return
    emit(summary, as_json, deepspeed_text(summary) + ("" if dry_run else f"\nwrote {dst}"))
