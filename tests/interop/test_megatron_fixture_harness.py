"""The harness reproduces the logits of the real-Megatron-written fixture.

fixtures/megatron_torch_tp2pp2/ was written by real megatron-core (TP=2, PP=2) together
with the logits that very model produced (fixtures/make_megatron_torch_fixture.py).
Loading it back through ``megatron_logits`` (args -> fresh GPTModel per rank ->
strict load -> pipeline forward) must give the same logits.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", exc_type=ImportError)
pytest.importorskip("psutil", exc_type=ImportError)
from safetensors.torch import load_file  # noqa: E402

from mcore_harness import megatron_logits, read_megatron_args, safe_torch_load  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "megatron_torch_tp2pp2"


@pytest.fixture(scope="module")
def reference():
    if not (FIXTURE / "reference_logits.safetensors").is_file():
        pytest.fail(f"fixture missing: run fixtures/make_megatron_torch_fixture.py ({FIXTURE})")
    return load_file(str(FIXTURE / "reference_logits.safetensors"))


def test_fixture_layout(reference):
    assert (FIXTURE / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    args = read_megatron_args(FIXTURE)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.vocab_size, args.padded_vocab_size) == (250, 256)
    for tp in range(2):
        for pp in range(2):
            st = safe_torch_load(FIXTURE / "iter_0000010" / f"mp_rank_{tp:02d}_{pp:03d}" / "model_optim_rng.pt")
            assert st["checkpoint_version"] == 3.0 and st["iteration"] == 10
            assert ("embedding.word_embeddings.weight" in st["model"]) == (pp == 0)
            assert ("output_layer.weight" in st["model"]) == (pp == 1)
            assert st["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
            assert "np_rng_state" in st["rng_state"][0]
    assert reference["tokens"].dtype == torch.int64 and reference["tokens"].shape == (2, 8)
    assert reference["logits"].dtype == torch.float32 and reference["logits"].shape == (2, 8, 250)
    assert int(reference["tokens"].max()) < 250
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 1_000_000


def test_harness_reproduces_megatron_reference_logits(reference):
    t0 = time.perf_counter()
    out = megatron_logits(FIXTURE, reference["tokens"])
    print(f"megatron_logits on fixture (4 ranks): {time.perf_counter() - t0:.1f}s")
    assert out.shape == reference["logits"].shape
    torch.testing.assert_close(out, reference["logits"], atol=1e-5, rtol=0)


def test_corrupted_fixture_is_detected(reference, tmp_path):
    """Negative control: swap two RMSNorm weights of one rank file -> logits must move."""
    root = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, root)
    f = root / "iter_0000010" / "mp_rank_00_001" / "model_optim_rng.pt"
    st = safe_torch_load(f)
    m = st["model"]
    a, b = "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"
    m[a], m[b] = m[b], m[a]
    torch.save(st, f)
    out = megatron_logits(root, reference["tokens"])
    assert (out - reference["logits"]).abs().max().item() > 1e-3
