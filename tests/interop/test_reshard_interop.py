"""Real Megatron-Core loads `ckptconv reshard` output at its new TP/PP (strict load on every gloo
rank) and its logits match transformers' within 1e-4: per-rank torch output (read at the layout
written in its args) and torch_dist output written by two workers (one DCP checkpoint)."""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", exc_type=ImportError)

from ckptconv import hf_to_megatron
from ckptconv.engine.reshard import reshard
from mcore_dist_harness import megatron_dist_logits
from mcore_harness import megatron_logits
from tiny_models import hf_logits, tokens


@pytest.fixture(scope="module")
def tp2pp2(hf_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard-src") / "mg"
    hf_to_megatron(hf_model_dir("llama-gqa"), out, tp=2, pp=2, ckpt_format="torch", show_progress=False)
    return out


def diff(got, hf_dir, ids) -> float:
    ref = hf_logits(hf_dir, ids)
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("tp,pp,vpp,workers", [
    (1, 4, None, 2),
    pytest.param(4, 1, None, 1, marks=pytest.mark.slow),
    pytest.param(1, 2, 2, 2, marks=pytest.mark.slow),
])
def test_megatron_core_loads_resharded_torch_checkpoint(hf_model_dir, tp2pp2, tmp_path, tp, pp, vpp, workers):
    out = tmp_path / "mg"
    reshard(tp2pp2, out, ckpt_format="torch", tp=tp, pp=pp, vpp=vpp, workers=workers, show_progress=False)
    ids = tokens(vocab=250)
    assert diff(megatron_logits(out, ids), hf_model_dir("llama-gqa"), ids) < 1e-4


def test_megatron_core_loads_torch_dist_written_by_two_workers(hf_model_dir, tp2pp2, tmp_path):
    out = tmp_path / "dist"
    reshard(tp2pp2, out, ckpt_format="torch_dist", tp=1, pp=1, workers=2, show_progress=False)
    assert {p.name.split("_")[2] for p in (out / "release").glob("__*.distcp")} == {"0", "1"}
    ids = tokens(vocab=250)
    assert diff(megatron_dist_logits(out, ids, tp=2, pp=1), hf_model_dir("llama-gqa"), ids) < 1e-4


def test_broken_reshard_fails_the_same_check(hf_model_dir, tp2pp2, tmp_path):
    """Calibration: the same check on a resharded checkpoint with two layers' weights swapped."""
    import argparse

    import torch

    out = tmp_path / "mg"
    reshard(tp2pp2, out, ckpt_format="torch", tp=1, pp=4, show_progress=False)
    a, b = (out / "release" / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt" for p in (1, 2))
    with torch.serialization.safe_globals([argparse.Namespace]):
        ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    key = "decoder.layers.0.mlp.linear_fc2.weight"
    ca["model"][key], cb["model"][key] = cb["model"][key], ca["model"][key]
    torch.save(ca, a)
    torch.save(cb, b)
    ids = tokens(vocab=250)
    assert diff(megatron_logits(out, ids), hf_model_dir("llama-gqa"), ids) > 1e-3


def test_megatron_core_loads_uneven_pipeline_reshard(hf_model_dir, tmp_path):
    """PP2 with 1 of 3 layers on the first stage (decoder_first_pipeline_num_layers in args)."""
    from ckptconv import hf_to_megatron
    from ckptconv.engine.reshard import reshard
    from mcore_harness import megatron_logits
    from tiny_models import hf_logits, tokens

    src = hf_model_dir("llama-3layer")
    hf_to_megatron(src, tmp_path / "a", ckpt_format="torch", impl="local", show_progress=False)
    reshard(tmp_path / "a", tmp_path / "b", ckpt_format="torch", pp=2, first_stage_layers=1, show_progress=False)
    ids = tokens(vocab=250)
    diff = (megatron_logits(tmp_path / "b", ids) - hf_logits(src, ids)).abs().max().item()
    assert diff < 1e-4, diff
