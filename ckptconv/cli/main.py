"""The `ckptconv` command group: one thin command per module."""
from __future__ import annotations

import click

from .. import __version__
from . import hf_to_megatron, inspect_cmd, megatron_to_hf, verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptconv")
def cli():
    """Convert, reshard and verify LLM checkpoints (Hugging Face <-> Megatron-Core)."""


for module in (hf_to_megatron, megatron_to_hf, inspect_cmd, verify):
    cli.add_command(module.command)


def main():
    cli()
