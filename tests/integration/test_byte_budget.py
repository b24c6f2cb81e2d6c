"""Streaming by row slices under the engine's byte budget: a budget far smaller than the largest
tensor still gives bit-exact round trips in all three directions and every writer, and the
buffered bytes the engine tracks never exceed it (real megatron-core loading these outputs:
tests/interop/test_byte_budget_interop.py)."""
from __future__ import annotations

import json

import pytest
import torch

from ckptconv import hf_to_megatron, megatron_to_hf
from ckptconv.engine.reshard import reshard
from ckptconv.engine.budget import Budget
from helpers import assert_same_hf, assert_same_rank_models, hf_tensors

BUDGET = 32 << 10         # 32 KiB: 8 blocks of 4 KiB


def _within(summary: dict) -> None:
    assert 0 < summary["buffered_peak_bytes"] <= BUDGET == summary["memory_budget_bytes"]
    assert summary["whole_tensors_over_budget"] == []


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_round_trips_bit_exact_under_a_budget_below_the_largest_tensor(hf_model_dir, tmp_path, fmt):
    src = hf_model_dir("llama-gqa")
    largest = max(t.numel() * t.element_size() for t in hf_tensors(src).values())
    assert largest > BUDGET              # the embedding alone does not fit: it must go in pieces
    s1 = hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, ckpt_format=fmt, show_progress=False, memory_budget=BUDGET)
    s2 = megatron_to_hf(tmp_path / "mg", tmp_path / "hf", show_progress=False, memory_budget=BUDGET)
    assert_same_hf(src, tmp_path / "hf")
    for s in (s1, s2):
        _within(s)
    # reshard under the budget, to the other format and layout, and back: the same files' tensors
    s3 = reshard(tmp_path / "mg", tmp_path / "r", ckpt_format="torch", tp=4, pp=1, show_progress=False,
                 memory_budget=BUDGET)
    s4 = reshard(tmp_path / "r", tmp_path / "back", ckpt_format=fmt, tp=2, pp=2, show_progress=False,
                 memory_budget=BUDGET)
    for s in (s3, s4):
        _within(s)
    megatron_to_hf(tmp_path / "back", tmp_path / "hf2", show_progress=False)
    assert_same_hf(src, tmp_path / "hf2")
    if fmt == "torch":
        assert_same_rank_models(tmp_path / "mg", tmp_path / "back")
    # the fingerprints hashed from the pieces as they were read are the ones of the whole tensors
    manifests = [json.loads((tmp_path / d / "ckptconv-manifest.json").read_text())["tensors"]
                 for d in ("mg", "hf", "r", "back")]
    assert all(m == manifests[0] for m in manifests) and len(manifests[0]) == len(hf_tensors(src))


def test_default_budget_output_equals_tiny_budget_output(hf_model_dir, tmp_path):
    src = hf_model_dir("qwen2")      # qkv biases, GQA: row maps of the fused QKV
    hf_to_megatron(src, tmp_path / "a", tp=2, pp=1, ckpt_format="torch", show_progress=False)
    hf_to_megatron(src, tmp_path / "b", tp=2, pp=1, ckpt_format="torch", show_progress=False, memory_budget=BUDGET)
    assert_same_rank_models(tmp_path / "a", tmp_path / "b")


def test_nan_found_in_a_piece_fails_with_nothing_kept(hf_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from ckptconv.errors import NonFiniteWeights
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama-gqa"), src)
    f = next(src.glob("*.safetensors"))
    state = load_file(f)
    emb = state["model.embed_tokens.weight"]
    emb[-3, 5] = float("nan")             # in the last piece of the embedding
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeights, match="1 NaN/Inf"):
        hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, show_progress=False, memory_budget=BUDGET)
    assert not (tmp_path / "mg").exists()


def test_budget_pool_never_holds_more_than_its_limit():
    b = Budget(BUDGET)
    bufs = [b.take(b.block_bytes) for _ in range(8)]
    assert b.held == BUDGET
    import threading
    got = []
    t = threading.Thread(target=lambda: got.append(b.take(100)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got          # a ninth block waits for one to come back
    b.give(bufs.pop().view(torch.int16))     # any view of a buffer returns it
    t.join(5)
    assert got and b.peak == BUDGET and b.held == BUDGET
