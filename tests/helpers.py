"""Helpers shared by the test modules: run the CLI in-process, check the one-line input-error
contract, hash a directory tree, and compare HF / per-rank Megatron checkpoints exactly."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptconv.cli.main import cli
from safe_load import load_megatron_file


def run(*args):
    """``ckptconv ARGS...`` in this process (exceptions propagate)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *needles):
    """Exit code 2 and exactly one ``error:`` line, which contains every needle."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def tree_hash(root) -> str:
    """SHA-256 over every file's relative path and bytes (``__pycache__`` ignored)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def hf_tensors(path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_hf(a, b, *, config: bool = False):
    """Same tensor names, dtypes and values (and, with ``config``, the same config.json)."""
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name
    if config:
        assert json.loads((Path(a) / "config.json").read_text()) == json.loads((Path(b) / "config.json").read_text())


def rank_models(root) -> dict:
    """Per-rank ``model*`` dicts of a torch-format checkpoint (torch.load, weights only, with the
    exact allowlist of ``safe_load``: independent of what earlier tests imported or registered)."""
    out = {}
    for f in sorted(Path(root).glob("*/mp_rank_*/model_optim_rng.pt")):
        state = load_megatron_file(f)
        for key in (k for k in state if k.startswith("model")):
            out[f"{f.parent.name}/{key}"] = state[key]
    return out


def assert_same_rank_models(a, b):
    ma, mb = rank_models(a), rank_models(b)
    assert sorted(ma) == sorted(mb) and ma
    for rank in ma:
        assert sorted(ma[rank]) == sorted(mb[rank]), rank
        for k, v in ma[rank].items():
            assert (v is None and mb[rank][k] is None) or torch.equal(v, mb[rank][k]), (rank, k)
