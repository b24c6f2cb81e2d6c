"""`ckptconv hf-to-dcp SRC DST`"""
from __future__ import annotations

import click

from ..engine.dcp_convert import NAMINGS, hf_to_dcp
from .common import (debug_option, dtype_arg, dtype_option, emit, handle_errors, human_bytes, json_option,
                     nonfinite_option, overwrite_option,
                     launcher_option, silent_rank, workers_option)


@click.command("hf-to-dcp")
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--naming", type=click.Choice(NAMINGS), default="hf", show_default=True,
              help="hf: the names get_model_state_dict gives an HF model under FSDP2; torchtitan: its Llama 3 names.")
@click.option("--state-dict-key", default=None,
              help="Store the weights under this key, as dcp.save({KEY: state_dict}) does (e.g. model).")
@click.option("--iteration", default="latest", show_default=True, help="For Megatron / DeepSpeed / torchtitan sources.")
@click.option("--hf-config", type=click.Path(exists=True), default=None,
              help="HF config.json (or its directory) when SRC carries none.")
@click.option("--cache-dir", type=click.Path(), default=None, help="Hugging Face hub cache for repo ids.")
@dtype_option
@click.option("--dry-run", is_flag=True, help="Print what would be written; read and write no tensor.")
@overwrite_option
@nonfinite_option
@workers_option
@launcher_option
@json_option
@debug_option
@handle_errors
def command(src, dst, naming, state_dict_key, iteration, hf_config, cache_dir, dtype, dry_run, overwrite,
            allow_nonfinite, workers, launcher, as_json):
    """Write any checkpoint ckptconv reads (HF, Megatron, DeepSpeed, DCP) as a model-only torch DCP checkpoint."""
    s = hf_to_dcp(src, dst, naming=naming, state_dict_key=state_dict_key, dtype=dtype_arg(dtype), iteration=iteration,
                  hf_config=hf_config, cache_dir=cache_dir, overwrite=overwrite, dry_run=dry_run,
                  allow_nonfinite=allow_nonfinite, show_progress=not as_json, workers=workers, launcher=launcher)
    if silent_rank(launcher):
        return
    text = (f"{s['format']} ({s['naming']} names{', under ' + repr(s['state_dict_key']) if s['state_dict_key'] else ''})"
            f": write {s['tensors_written']} tensors, {human_bytes(s['bytes_written'])}")
    emit(s, as_json, text + ("" if dry_run else f"\nwrote {dst}"))
