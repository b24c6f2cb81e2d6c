"""`ckptconv inspect CKPT`"""
from __future__ import annotations

import click

from ..inspect import inspect_checkpoint, inspect_text
from .common import debug_option, emit, handle_errors, json_option


@click.command("inspect")
@click.argument("ckpt")
@click.option("--iteration", default="latest", show_default=True, help="Megatron: 'latest', 'release' or N.")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@json_option
@debug_option
@handle_errors
def command(ckpt, iteration, show_tensors, as_json):
    """Describe a checkpoint: format, family, parallel layout, tensors, dtypes, size."""
    info = inspect_checkpoint(ckpt, iteration=iteration)
    emit(info, as_json, inspect_text(info, show_tensors))
