"""The bundled runtime and REAL Megatron-Core give the same logits on the same checkpoint
(our hf-to-megatron output, per-rank torch format, at the TP/PP it was written for)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from ckptconv import hf_to_megatron  # noqa: E402
from ckptconv.runtime import logits  # noqa: E402
from mcore_harness import megatron_logits  # noqa: E402
from tiny_models import tokens  # noqa: E402

FAMILIES = ["llama-gqa", "qwen2", "llama-tied", "mistral"]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
DEFAULT = {(v, 2, 2) for v in FAMILIES}


@pytest.mark.parametrize("variant,tp,pp", [
    pytest.param(v, t, p, marks=() if (v, t, p) in DEFAULT else pytest.mark.slow)
    for v in FAMILIES for t, p in LAYOUTS], ids=lambda x: str(x))
def test_runtime_matches_megatron_core(hf_model_dir, tmp_path, variant, tp, pp):
    dst = tmp_path / "mg"
    hf_to_megatron(hf_model_dir(variant), dst, tp=tp, pp=pp, impl="local", ckpt_format="torch",
                   show_progress=False)
    ids = tokens(vocab=250)
    ref = megatron_logits(dst, ids)
    got = logits(dst, ids, timeout_s=300)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    print(f"{variant} tp{tp} pp{pp}: runtime vs megatron-core max |diff| {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.slow
def test_runtime_matches_megatron_core_virtual_pipeline(hf_model_dir, tmp_path):
    dst = tmp_path / "mg"
    hf_to_megatron(hf_model_dir("llama3-rope"), dst, tp=2, pp=2, vpp=2, ckpt_format="torch", show_progress=False)
    ids = tokens(vocab=250)
    assert (logits(dst, ids, timeout_s=300) - megatron_logits(dst, ids)).abs().max().item() < 1e-4
