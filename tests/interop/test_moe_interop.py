"""Real megatron-core 0.16.1 (CPU, gloo, the MoE GPTModel with SequentialMLP experts) loads what
`ckptconv reshard` writes from Mixture-of-Experts checkpoints megatron-core itself saved at EP 2,
strictly on every rank, at other EP / ETP / TP / PP degrees, and reproduces the logits megatron
computed when it saved them (fixtures/make_megatron_moe_fixture.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("megatron.core", exc_type=ImportError)

from safetensors.torch import load_file

from ckptconv.engine.reshard import reshard
from mcore_dist_harness import megatron_dist_logits
from mcore_harness import megatron_logits

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TP2PP2EP2 = FIXTURES / "megatron_moe_tp2pp2ep2"


def _diff(got, ref) -> float:
    assert got.shape == ref["logits"].shape
    return (got - ref["logits"]).abs().max().item()


def test_harness_reproduces_the_ep2_fixture_logits():
    ref = load_file(FIXTURES / "megatron_moe_torch_ep2" / "reference_logits.safetensors")
    assert _diff(megatron_logits(FIXTURES / "megatron_moe_torch_ep2", ref["tokens"]), ref) < 1e-6


@pytest.mark.parametrize("kw", [
    dict(tp=2, pp=1, ep=2, etp=2),
    pytest.param(dict(tp=1, pp=2, ep=4), marks=pytest.mark.slow),
    pytest.param(dict(tp=1, pp=1, ep=1), marks=pytest.mark.slow),
])
def test_megatron_core_loads_per_rank_output_resharded_across_ep(tmp_path, kw):
    ref = load_file(TP2PP2EP2 / "reference_logits.safetensors")
    reshard(TP2PP2EP2 / "torch", tmp_path / "out", ckpt_format="torch", show_progress=False, **kw)
    assert _diff(megatron_logits(tmp_path / "out", ref["tokens"]), ref) < 1e-4


@pytest.mark.parametrize("kw,load", [
    (dict(tp=1, pp=1, ep=1), dict(tp=2, pp=1, ep=2)),
    pytest.param(dict(ep=4), dict(tp=1, pp=2, ep=4), marks=pytest.mark.slow),
])
def test_megatron_core_loads_torch_dist_output_with_the_global_expert_axis(tmp_path, kw, load):
    ref = load_file(TP2PP2EP2 / "reference_logits.safetensors")
    reshard(TP2PP2EP2 / "torch", tmp_path / "out", ckpt_format="torch_dist", show_progress=False, **kw)
    assert _diff(megatron_dist_logits(tmp_path / "out", ref["tokens"], **load), ref) < 1e-4
