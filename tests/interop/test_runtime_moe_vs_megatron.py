"""The bundled runtime and REAL Megatron-Core (0.16.1 on CPU/gloo, allgather dispatcher) give the
same logits on the same Mixture-of-Experts checkpoint (our hf-to-megatron output, per-rank torch,
local spec, at the TP/PP/EP/ETP it was written for)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from ckptconv import hf_to_megatron  # noqa: E402
from ckptconv.runtime import logits  # noqa: E402
from mcore_harness import megatron_logits  # noqa: E402
from tiny_models import tokens  # noqa: E402


@pytest.mark.parametrize("variant,kw", [
    ("qwen2-moe", dict(tp=2, pp=1, ep=2)),
    pytest.param("mixtral", dict(tp=2, pp=2, ep=2), marks=pytest.mark.slow),
    pytest.param("qwen3-moe", dict(tp=2, pp=1, ep=2, etp=2), marks=pytest.mark.slow),
], ids=lambda x: str(x))
def test_runtime_matches_megatron_core_on_moe(hf_model_dir, tmp_path, variant, kw):
    dst = tmp_path / "mg"
    hf_to_megatron(hf_model_dir(variant), dst, impl="local", ckpt_format="torch", show_progress=False, **kw)
    ids = tokens(vocab=250)
    ref = megatron_logits(dst, ids)
    got = logits(dst, ids, timeout_s=300)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    print(f"{variant} {kw}: runtime vs megatron-core max |diff| {diff:.3g}")
    assert diff < 1e-4
