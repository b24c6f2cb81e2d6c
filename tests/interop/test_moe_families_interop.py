"""Real megatron-core 0.16.1 (CPU, gloo) builds the MoE GPTModel from the args ckptconv writes
(experts per moe_layer_freq, shared expert and gate, q/k norm), loads `hf-to-megatron` output
strictly on every rank at EP 2 (with TP and PP > 1 in some cases) and matches transformers'
logits within 1e-4: Mixtral, Qwen2-MoE (dense and sparse layers mixed) and Qwen3-MoE."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", exc_type=ImportError)

from ckptconv import hf_to_megatron
from mcore_dist_harness import megatron_dist_logits
from mcore_harness import megatron_logits
from tiny_models import hf_logits, tokens


def _diff(got, hf_dir, ids) -> float:
    ref = hf_logits(hf_dir, ids)
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("variant,kw", [
    ("mixtral", dict(tp=2, pp=2, ep=2)),
    ("qwen2-moe", dict(tp=1, pp=2, ep=2)),
    pytest.param("qwen3-moe", dict(tp=2, pp=1, ep=2, etp=2), marks=pytest.mark.slow),
    pytest.param("qwen2-moe", dict(tp=2, pp=2, ep=2, etp=2), marks=pytest.mark.slow),
])
def test_megatron_core_loads_per_rank_moe_output(hf_model_dir, tmp_path, variant, kw):
    hf_to_megatron(hf_model_dir(variant), tmp_path / "mg", ckpt_format="torch", impl="local", show_progress=False, **kw)
    ids = tokens(vocab=250)
    assert _diff(megatron_logits(tmp_path / "mg", ids), hf_model_dir(variant), ids) < 1e-4


@pytest.mark.parametrize("variant,load", [
    ("qwen3-moe", dict(tp=2, pp=1, ep=2)),
    pytest.param("qwen2-moe", dict(tp=2, pp=1, ep=2), marks=pytest.mark.slow),
    pytest.param("mixtral", dict(tp=1, pp=2, ep=2), marks=pytest.mark.slow),
])
def test_megatron_core_loads_torch_dist_moe_output_at_ep2(hf_model_dir, tmp_path, variant, load):
    hf_to_megatron(hf_model_dir(variant), tmp_path / "mg", ckpt_format="torch_dist", ep=4, show_progress=False)
    ids = tokens(vocab=250)
    assert _diff(megatron_dist_logits(tmp_path / "mg", ids, **load), hf_model_dir(variant), ids) < 1e-4
