"""Real Megatron-Core loads what several workers wrote: hf-to-megatron torch_dist written by two
local workers (one DCP checkpoint, each worker's own record files, rank 0's .metadata) is loaded by
megatron-core's dist_checkpointing at TP2 (strict load on every gloo rank) and its logits match
transformers' within 1e-4; the same for per-rank torch files written by two workers."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", exc_type=ImportError)

from ckptconv import hf_to_megatron
from mcore_dist_harness import megatron_dist_logits
from mcore_harness import megatron_logits
from tiny_models import hf_logits, tokens


def diff(got, hf_dir, ids) -> float:
    ref = hf_logits(hf_dir, ids)
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


def test_megatron_core_loads_torch_dist_written_by_two_workers(hf_model_dir, tmp_path):
    src, out = hf_model_dir("llama-gqa"), tmp_path / "dist"
    s = hf_to_megatron(src, out, tp=2, pp=1, ckpt_format="torch_dist", workers=2, show_progress=False)
    assert s["workers"] == 2
    assert {p.name.split("_")[2] for p in (out / "release").glob("__*.distcp")} == {"0", "1"}
    ids = tokens(vocab=250)
    assert diff(megatron_dist_logits(out, ids, tp=2, pp=1), src, ids) < 1e-4


def test_megatron_core_loads_rank_files_written_by_two_workers(hf_model_dir, tmp_path):
    src, out = hf_model_dir("llama-gqa"), tmp_path / "mg"
    assert hf_to_megatron(src, out, tp=1, pp=2, ckpt_format="torch", workers=2, show_progress=False)["workers"] == 2
    ids = tokens(vocab=250)
    assert diff(megatron_logits(out, ids), src, ids) < 1e-4
