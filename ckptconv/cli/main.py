"""The `ckptconv` command group. Every module in this package that defines a click `command`
is one subcommand (one thin command per file)."""
from __future__ import annotations

import importlib
import pkgutil

import click

from .. import __version__
from . import __path__ as _cli_path


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptconv")
def cli():
    """Convert, reshard and verify LLM checkpoints (Hugging Face <-> Megatron-Core)."""


for _info in sorted((m for m in pkgutil.iter_modules(_cli_path) if not m.name.startswith("_")), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__.rsplit('.', 1)[0]}.{_info.name}")
    if isinstance(getattr(_module, "command", None), click.Command):
        cli.add_command(_module.command)


def main():
    cli()
