"""DeepSpeed checkpoints (written by real DeepSpeed) -> Megatron TP2 PP2 per-rank `torch` files, loaded by
REAL Megatron-Core (strict load_state_dict on 4 gloo ranks): logits match the trained model's."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("megatron.core")

from ckptconv.engine.deepspeed_convert import deepspeed_to_megatron  # noqa: E402
from mcore_harness import megatron_logits  # noqa: E402

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "deepspeed"


@pytest.mark.parametrize("case,impl", [("z2_fp32", "transformer_engine"), ("pipe_tp2pp2", "local")])
def test_deepspeed_to_megatron_tp2pp2_matches_trained_logits(tmp_path, case, impl):
    d = FIX / case
    summary = deepspeed_to_megatron(d / "checkpoint", tmp_path / "mg", tp=2, pp=2, impl=impl, ckpt_format="torch",
                                    hf_config=d / "config.json", show_progress=False)
    assert (summary["tp"], summary["pp"], summary["weights"]) == (2, 2, "master")
    ref = load_file(d / "reference_logits.safetensors")
    got = megatron_logits(tmp_path / "mg", ref["tokens"])
    assert got.shape == ref["logits"].shape
    assert (got - ref["logits"]).abs().max().item() < 1e-4
