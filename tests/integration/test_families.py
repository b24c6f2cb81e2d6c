"""Qwen3, Phi-3, GPT-2 and the window-carrying Mistral / Qwen2 variants, end to end:
HF -> Megatron (TP/PP, both formats) -> HF bit-exact in fp32 and bf16, reshard round trips,
the bundled runtime against transformers' logits, inspect and verify naming the family's
own tensors."""
from __future__ import annotations

import json

import pytest
import torch

from ckptconv import hf_to_megatron, megatron_to_hf
from ckptconv.engine.reshard import reshard
from ckptconv.runtime import logits
from helpers import assert_same_hf, assert_same_rank_models, run
from tiny_models import hf_logits, tokens

NEW = ["qwen3", "qwen3-tied", "phi3", "gpt2", "mistral-window", "qwen2-window", "gemma2", "gemma3"]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
IDS = tokens(vocab=250, batch=2, seq=16, seed=3)       # seq 16 > window 5: windows matter


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("variant", NEW)
def test_round_trip_fp32_bit_exact(hf_model_dir, tmp_path, variant, tp, pp, fmt):
    src = hf_model_dir(variant)
    hf_to_megatron(src, tmp_path / "mg", tp=tp, pp=pp, ckpt_format=fmt, show_progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", show_progress=False)
    assert_same_hf(src, tmp_path / "hf", config=True)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("variant", NEW)
def test_round_trip_bf16_bit_exact(hf_model_dir, tmp_path, variant, fmt):
    src = hf_model_dir(variant, torch.bfloat16)
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, ckpt_format=fmt, show_progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", show_progress=False)
    assert_same_hf(src, tmp_path / "hf", config=True)


@pytest.mark.parametrize("variant", ["qwen3", "phi3", "gpt2", "gemma2", "gemma3"])
def test_reshard_round_trip_exact(hf_model_dir, tmp_path, variant):
    src = hf_model_dir(variant)
    hf_to_megatron(src, tmp_path / "a", tp=2, pp=2, ckpt_format="torch", show_progress=False)
    reshard(tmp_path / "a", tmp_path / "b", ckpt_format="torch_dist", tp=1, pp=1, show_progress=False)
    reshard(tmp_path / "b", tmp_path / "c", ckpt_format="torch", tp=1, pp=4, show_progress=False)
    reshard(tmp_path / "c", tmp_path / "d", ckpt_format="torch", tp=2, pp=2, show_progress=False)
    assert_same_rank_models(tmp_path / "a", tmp_path / "d")
    megatron_to_hf(tmp_path / "c", tmp_path / "hf", show_progress=False)
    assert_same_hf(src, tmp_path / "hf", config=True)


@pytest.fixture(scope="module")
def ref(hf_model_dir):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = hf_logits(hf_model_dir(variant), IDS)
        return cache[variant]
    return get


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("variant", ["qwen3", "phi3", "gpt2", "mistral-window", "qwen2-window", "gemma2", "gemma3"])
def test_runtime_matches_transformers(hf_model_dir, ref, tmp_path, variant, tp, pp):
    hf_to_megatron(hf_model_dir(variant), tmp_path / "mg", tp=tp, pp=pp, ckpt_format="torch", show_progress=False)
    got = logits(tmp_path / "mg", IDS, timeout_s=300)
    assert got.shape == ref(variant).shape
    assert (got - ref(variant)).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["qwen3", "gpt2"])
def test_runtime_from_hf_and_torch_dist_at_tp2_pp2(hf_model_dir, ref, tmp_path, variant):
    assert (logits(hf_model_dir(variant), IDS, tp=2, timeout_s=300) - ref(variant)).abs().max().item() < 1e-4
    hf_to_megatron(hf_model_dir(variant), tmp_path / "mg", tp=2, pp=2, ckpt_format="torch_dist", show_progress=False)
    assert (logits(tmp_path / "mg", IDS, timeout_s=300) - ref(variant)).abs().max().item() < 1e-4


def test_runtime_window_is_not_full_attention(hf_model_dir, ref):
    """Calibration: the window changes the logits (so the window tests above can fail)."""
    import transformers
    full = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir("mistral-window"))
    full.config.sliding_window = None
    assert (hf_logits(full, IDS) - ref("mistral-window")).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant,family", [("qwen3", "qwen3"), ("phi3", "phi3"), ("gpt2", "gpt2"), ("gemma2", "gemma2"),
                                            ("gemma3", "gemma3")])
def test_inspect_names_the_family(hf_model_dir, tmp_path, variant, family):
    src = hf_model_dir(variant)
    hf_to_megatron(src, tmp_path / "mg", tp=2, ckpt_format="torch", show_progress=False)
    for path in (src, tmp_path / "mg"):
        r = run("inspect", str(path), "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["family"] == family


@pytest.mark.parametrize("variant,rank,key,needle", [
    ("qwen3", "mp_rank_00_001", "decoder.layers.0.self_attention.q_layernorm.weight", "layer 2 q_layernorm: q_norm"),
    ("gpt2", "mp_rank_00_000", "embedding.position_embeddings.weight", "position_embeddings: wpe"),
    ("phi3", "mp_rank_01_000", "decoder.layers.1.self_attention.linear_qkv.weight", "layer 1 linear_qkv"),
])
def test_verify_names_the_family_specific_parameter(hf_model_dir, tmp_path, variant, rank, key, needle):
    """One value changed in a per-rank file: verify exits 1 and names the parameter."""
    import argparse
    src = hf_model_dir(variant)
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, ckpt_format="torch", show_progress=False)
    path = tmp_path / "mg" / "release" / rank / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(path, weights_only=True)
    ck["model"][key][3] += 0.5
    torch.save(ck, path)
    r = run("verify", str(src), str(tmp_path / "mg"), "--json", "-")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    failed = [t for t in report["tensors"] if t["status"] != "equal"]
    assert len(failed) == 1 and needle in failed[0]["diagnosis"], failed


@pytest.mark.parametrize("key,value", [("final_logit_softcapping", None), ("attn_logit_softcapping", None),
                                       ("query_pre_attn_scalar", 16)])
def test_gemma_features_change_the_runtime_logits(hf_model_dir, ref, key, value):
    """Calibration: running the same Gemma 2 weights with one feature dropped moves the logits
    by more than the 1e-4 the runtime tests accept (so those tests can fail)."""
    cfg = json.loads((hf_model_dir("gemma2") / "config.json").read_text())
    got = logits(hf_model_dir("gemma2"), IDS, hf_config={**cfg, key: value})
    assert (got - ref("gemma2")).abs().max().item() > 1e-3
