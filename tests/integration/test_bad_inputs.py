"""Every bad-input case: exit 2, one line naming file/tensor + fix, no output, input unchanged."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptconv.cli.main import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bad_inputs.cases import CASES  # noqa: E402
from helpers import tree_hash


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, hf_model_dir):
    built = case.build(tmp_path, hf_model_dir)
    before = {p: tree_hash(p) for p in built.inputs}
    result = CliRunner().invoke(cli, built.argv)
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix: " in lines[0], result.stderr
    for needle in built.needles:
        assert needle in lines[0], (needle, lines[0])
    assert not built.dst.exists()
    assert not [p for p in built.dst.parent.iterdir() if p.name.startswith(f".{built.dst.name}")]
    assert {p: tree_hash(p) for p in built.inputs} == before
    if built.marker is not None:
        assert not built.marker.exists(), "the pickle payload ran"


def test_no_weights_only_false_in_package():
    pkg = Path(__file__).resolve().parents[2] / "ckptconv"
    hits = [str(p) for p in pkg.rglob("*.py") if "weights_only=False" in p.read_text().replace(" ", "")]
    assert hits == []


def test_module_entry_point_reports_errors_in_a_subprocess(tmp_path):
    """`python -m ckptconv` is the same CLI: exit 2 and one line, in a real process."""
    proc = subprocess.run([sys.executable, "-m", "ckptconv", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "does not exist" in proc.stderr
