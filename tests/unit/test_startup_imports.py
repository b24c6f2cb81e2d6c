"""Start-up cost: what loading the CLI imports (each check in a fresh interpreter).

`import ckptconv.cli.main` and `ckptconv --help` must not import torch (~1-2 s), and loading a
conversion command must not import transformers, torch.distributed.checkpoint (~1.5 s) or any
megatron package: those load only inside the code path that writes torch_dist / needs them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("transformers", "torch.distributed.checkpoint", "megatron", "deepspeed")


def _modules_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    return set(json.loads(r.stdout.splitlines()[-1]))


def _loaded(mods: set[str], roots) -> list[str]:
    return sorted(m for m in mods if any(m == r or m.startswith(r + ".") for r in roots))


def test_cli_main_imports_no_torch():
    mods = _modules_after("import ckptconv.cli.main")
    assert "ckptconv.cli.main" in mods
    assert _loaded(mods, ("torch", *HEAVY)) == []


def test_help_imports_no_command_module():
    mods = _modules_after("import ckptconv.cli.main as m\n"
                          "try:\n    m.cli(['--help'])\nexcept SystemExit:\n    pass")
    assert _loaded(mods, ("torch", *HEAVY)) == []
    assert [m for m in mods if m.startswith("ckptconv.cli.") and m not in ("ckptconv.cli.main",)] == []


@pytest.mark.parametrize("command", ["hf_to_megatron", "megatron_to_hf", "reshard", "verify", "deepspeed_to_hf"])
def test_loading_a_command_imports_nothing_heavy(command):
    mods = _modules_after(f"import ckptconv.cli.{command}")
    assert _loaded(mods, HEAVY) == []


def test_help_lists_what_the_commands_say():
    """The source-read summaries of `--help` are the imported commands' own short help."""
    from click.testing import CliRunner

    from ckptconv.cli.main import LazyGroup, cli

    listed = CliRunner().invoke(cli, ["--help"]).output
    fresh = LazyGroup(name="x")
    for name in fresh.list_commands(None):
        short = fresh.get_command(None, name).get_short_help_str(45)
        assert short and short[:30] in listed, (name, short)
