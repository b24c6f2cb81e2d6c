"""The `ckptconv` command group. Every module in this package that defines a click `command`
is one subcommand (one thin command per file), named after its module: ``hf_to_megatron`` ->
``hf-to-megatron`` (a trailing ``_cmd`` is dropped: ``inspect_cmd`` -> ``inspect``).

Subcommands are imported only when invoked (click's lazy-group pattern): a conversion from
DeepSpeed or Hugging Face never pays for importing ``torch.distributed.checkpoint`` (~1.5 s)
or the runtime it does not use. ``--help`` imports them all to show their summaries.
"""
from __future__ import annotations

import importlib
import pkgutil

import click

from .. import __version__
from . import __path__ as _cli_path


def command_name(module: str) -> str:
    return module.removesuffix("_cmd").replace("_", "-")


def _command_modules() -> dict[str, str]:
    mods = (m.name for m in pkgutil.iter_modules(_cli_path) if not m.name.startswith("_"))
    return {command_name(m): f"{__name__.rsplit('.', 1)[0]}.{m}" for m in mods if m not in ("main", "common")}


class LazyGroup(click.Group):
    """A group whose subcommands are the ``command`` objects of this package's modules, imported
    on first use."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._modules = _command_modules()

    def list_commands(self, ctx):
        return sorted(set(self._modules) | set(self.commands))

    def get_command(self, ctx, name):
        if name not in self.commands and name in self._modules:
            cmd = getattr(importlib.import_module(self._modules[name]), "command", None)
            if not isinstance(cmd, click.Command) or cmd.name != name:
                raise RuntimeError(f"{self._modules[name]} must define a click command named {name!r}")
            self.commands[name] = cmd
        return self.commands.get(name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptconv")
def cli():
    """Convert, reshard and verify LLM checkpoints (Hugging Face <-> Megatron-Core)."""


def main():
    cli()
