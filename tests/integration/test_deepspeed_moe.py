"""A tiny transformers-5 Mixtral trained 2 steps under real DeepSpeed 0.19.8 ZeRO-2 on 2 gloo ranks
(fixtures/deepspeed/z2_mixtral_fp32, made by fixtures/make_deepspeed_fixtures.py). The engine's
parameters hold the experts packed (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]);
deepspeed-to-hf writes the hub layout, equal to what transformers' own save_pretrained makes of
the engine's fp32 master weights, and deepspeed-to-megatron at EP 2 round-trips to the same."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_same_hf, run
from tiny_models import hf_logits

CASE = Path(__file__).resolve().parents[2] / "fixtures" / "deepspeed" / "z2_mixtral_fp32"
pytestmark = pytest.mark.skipif(not CASE.is_dir(), reason="fixture not generated")


@pytest.fixture(scope="module")
def masters_in_hub_layout(tmp_path_factory):
    """The engine's fp32 masters (module weights: fp32 training) saved by transformers itself."""
    import transformers

    cfg = transformers.MixtralConfig.from_pretrained(CASE)
    model = transformers.MixtralForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(load_file(CASE / "module_weights.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    out = tmp_path_factory.mktemp("ds-moe") / "hub"
    model.save_pretrained(out)
    return out


def test_engine_names_are_packed():
    engine = load_file(CASE / "module_weights.safetensors")
    assert engine["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 32)
    assert engine["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 32)
    assert json.loads((CASE / "case.json").read_text())["optimizer"] == "DeepSpeedZeroOptimizer"
    theirs = load_file(CASE / "zero_to_fp32" / "model.safetensors")      # DeepSpeed's own consolidation
    assert set(theirs) <= set(engine) and all(torch.equal(theirs[n], engine[n]) for n in theirs)


def test_deepspeed_to_hf_writes_the_hub_layout_of_the_masters(tmp_path, masters_in_hub_layout):
    r = run("deepspeed-to-hf", CASE / "checkpoint", tmp_path / "hf", "--hf-config", CASE)
    assert r.exit_code == 0, r.output
    assert_same_hf(masters_in_hub_layout, tmp_path / "hf")
    ref = load_file(CASE / "reference_logits.safetensors")
    assert (hf_logits(tmp_path / "hf", ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-4


def test_deepspeed_to_megatron_at_ep2_and_back(tmp_path, masters_in_hub_layout):
    r = run("deepspeed-to-megatron", CASE / "checkpoint", tmp_path / "mg", "--hf-config", CASE,
            "--ep", "2", "--ckpt-format", "torch")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "mg" / "release").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    r = run("megatron-to-hf", tmp_path / "mg", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert_same_hf(masters_in_hub_layout, tmp_path / "hf")
