"""A checkpoint written by real Megatron-Core (per-rank torch format, TP=2 PP=2, with args and
numpy RNG state) converts to HF whose logits match Megatron-Core's stored logits."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ckptconv import inspect_checkpoint, megatron_to_hf
from safe_load import load_megatron_file, save_megatron_file
from tiny_models import hf_logits

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "megatron_torch_tp2pp2"


def test_real_megatron_checkpoint_to_hf_matches_megatron_logits(tmp_path):
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    summary = megatron_to_hf(FIXTURE, tmp_path / "hf", show_progress=False)
    assert summary["iteration"] == 10 and summary["family"] == "llama"
    logits = hf_logits(tmp_path / "hf", ref["tokens"])
    assert logits.shape == ref["logits"].shape
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff < 1e-4, diff


def test_real_megatron_checkpoint_with_wrong_layout_is_caught(tmp_path):
    """Negative control on the input that is read: the k and v rows of layer 1's query group in
    TP rank 1's file swapped (Megatron stores [q (2 heads); k; v] per group; TP=2 holds one
    group per rank) -> the conversion of that checkpoint no longer matches Megatron's logits."""
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    src = tmp_path / "mg"
    shutil.copytree(FIXTURE, src)
    f = src / "iter_0000010" / "mp_rank_01_000" / "model_optim_rng.pt"
    obj = load_megatron_file(f)
    w = obj["model"]["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert w.shape[0] == 2 * 16 + 16 + 16
    w[32:48], w[48:64] = w[48:64].clone(), w[32:48].clone()
    save_megatron_file(obj, f)
    megatron_to_hf(src, tmp_path / "hf", show_progress=False)
    diff = (hf_logits(tmp_path / "hf", ref["tokens"]) - ref["logits"]).abs().max().item()
    assert diff > 1e-3, diff


def test_inspect_lists_training_state():
    info = inspect_checkpoint(FIXTURE)
    assert (info["tp"], info["pp"], info["iteration"]) == (2, 2, 10)
    assert "rng_state" in info["other_state"] and info["transformer_impl"] == "local"
    assert info["vocab_size"] == 250 and info["padded_vocab_size"] == 256
    assert torch.Size(info["tensors"]["embedding.word_embeddings.weight"]["shape"]) == (256, 64)
