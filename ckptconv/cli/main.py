"""The `ckptconv` command group. Every module in this package that defines a click `command`
is one subcommand (one thin command per file), named after its module: ``hf_to_megatron`` ->
``hf-to-megatron`` (a trailing ``_cmd`` is dropped: ``inspect_cmd`` -> ``inspect``).

Subcommands are imported only when invoked (click's lazy-group pattern): a conversion from
DeepSpeed or Hugging Face never pays for importing ``torch.distributed.checkpoint`` (~1.5 s)
or the runtime it does not use. ``--help`` imports none of them: it lists each command's
summary from its module's source text (``ast``), so it costs no torch import.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
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

    def format_commands(self, ctx, formatter):
        """The command list of ``--help``, from the modules' source: nothing is imported."""
        rows = [(name, self.commands.get(name) or _listed_command(name, self._modules.get(name)))
                for name in self.list_commands(ctx)]
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])


def _listed_command(name: str, module: str) -> click.Command:
    """A stand-in carrying the help text of ``module``'s ``command`` function, read from the
    source with ``ast`` (the docstring is what click shows as the command's help)."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    doc = next((ast.get_docstring(n) for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name == "command"), None)
    return click.Command(name, help=doc or "")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptconv")
def cli():
    """Convert, reshard and verify LLM checkpoints (Hugging Face <-> Megatron-Core)."""


def main():
    cli()
