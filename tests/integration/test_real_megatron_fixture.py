"""A checkpoint written by real Megatron-Core (per-rank torch format, TP=2 PP=2, with args and
numpy RNG state) converts to HF whose logits match Megatron-Core's stored logits."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ckptconv import inspect_checkpoint, megatron_to_hf
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
    """Negative control: reading the same files as TE-named GQA with the groups reversed
    (by editing the HF output's k/v) no longer matches Megatron's logits."""
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    megatron_to_hf(FIXTURE, tmp_path / "hf", show_progress=False)
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(path)
    k, v = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    sd[k], sd[v] = sd[v].clone(), sd[k].clone()
    from safetensors.torch import save_file
    save_file(sd, path, metadata={"format": "pt"})
    diff = (hf_logits(tmp_path / "hf", ref["tokens"]) - ref["logits"]).abs().max().item()
    assert diff > 1e-3


def test_inspect_lists_training_state():
    info = inspect_checkpoint(FIXTURE)
    assert (info["tp"], info["pp"], info["iteration"]) == (2, 2, 10)
    assert "rng_state" in info["other_state"] and info["transformer_impl"] == "local"
    assert info["vocab_size"] == 250 and info["padded_vocab_size"] == 256
    assert torch.Size(info["tensors"]["embedding.word_embeddings.weight"]["shape"]) == (256, 64)
