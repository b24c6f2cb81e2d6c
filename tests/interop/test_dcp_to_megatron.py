"""A real FSDP2 checkpoint (2 gloo ranks, model + AdamW state) -> Megatron TP2 PP2, loaded by REAL
Megatron-Core (strict load_state_dict on 4 gloo ranks): logits match the live FSDP2 model's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptconv.engine.dcp_convert import dcp_to_megatron  # noqa: E402
from fsdp2_jobs import run_job  # noqa: E402
from mcore_harness import megatron_logits  # noqa: E402


def test_fsdp2_to_megatron_tp2pp2_matches_live_logits(tmp_path):
    job = run_job(tmp_path / "job", "llama-gqa", steps=2)
    summary = dcp_to_megatron(job / "model_optim", tmp_path / "mg", hf_config=job / "config", tp=2, pp=2,
                              ckpt_format="torch", show_progress=False)
    assert (summary["tp"], summary["pp"], summary["dcp_layout"], summary["wrapper"]) == (2, 2, "plain", "model.")
    live = torch.load(job / "logits.pt")
    got = megatron_logits(tmp_path / "mg", live["tokens"])
    assert got.shape == live["logits"].shape
    assert (got - live["logits"]).abs().max().item() < 1e-4
