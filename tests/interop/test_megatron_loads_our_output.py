"""Real Megatron-Core loads our hf-to-megatron output (strict load_state_dict on every gloo
rank, at the TP/PP it was written for) and its logits match transformers' within 1e-4."""
from __future__ import annotations

import argparse

import pytest
import torch

from ckptconv import hf_to_megatron
from mcore_harness import megatron_logits
from tiny_models import hf_logits, tokens

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MODELS = ["llama-gqa", "qwen2", "llama-tied"]


def max_diff_vs_hf(mg_dir, hf_dir) -> float:
    ids = tokens(vocab=250)
    ref = hf_logits(hf_dir, ids)
    got = megatron_logits(mg_dir, ids)
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("variant", MODELS)
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_megatron_core_logits_match_transformers(hf_model_dir, tmp_path, variant, tp, pp):
    src = hf_model_dir(variant)
    hf_to_megatron(src, tmp_path / "mg", tp=tp, pp=pp, impl="local", ckpt_format="torch", show_progress=False)
    assert max_diff_vs_hf(tmp_path / "mg", src) < 1e-4


def test_llama3_rope_scaling_and_virtual_pipeline(hf_model_dir, tmp_path):
    src = hf_model_dir("llama3-rope")
    hf_to_megatron(src, tmp_path / "mg", tp=1, pp=2, vpp=2, impl="local", ckpt_format="torch", show_progress=False)
    assert max_diff_vs_hf(tmp_path / "mg", src) < 1e-4


def test_transformer_engine_key_space_loads(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, ckpt_format="torch", show_progress=False)
    assert max_diff_vs_hf(tmp_path / "mg", src) < 1e-4


def test_swapped_k_v_fails_the_same_check(hf_model_dir, tmp_path):
    """A deliberately wrong layout: k and v rows swapped in query group 1 of one layer."""
    src = hf_model_dir("llama-gqa")
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=1, impl="local", ckpt_format="torch", show_progress=False)
    path = tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(path, weights_only=True)
    key = "decoder.layers.1.self_attention.linear_qkv.weight"
    w = ck["model"][key].clone()
    d, per = 8, 2                       # head_dim 8, 2 q heads per group; group 1 starts at 4*d
    g = (per + 2) * d
    k_rows, v_rows = slice(g + per * d, g + per * d + d), slice(g + per * d + d, 2 * g)
    w[k_rows], w[v_rows] = ck["model"][key][v_rows], ck["model"][key][k_rows]
    ck["model"][key] = w
    torch.save(ck, path)
    assert max_diff_vs_hf(tmp_path / "mg", src) > 1e-3
