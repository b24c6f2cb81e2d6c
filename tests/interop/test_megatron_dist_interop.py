"""Real Megatron-Core (`dist_checkpointing.load` into GPTModel on gloo ranks) loads our torch_dist
output at TP/PP (1,1), (2,1), (1,2), (2,2) and VPP -- whatever TP/PP it was converted at -- with
logits within 1e-4 of transformers; it loads the real fixtures and our reshard output at other
layouts; a deliberately broken checkpoint fails the same check. (Real fixtures of every version:
test_megatron_versions_interop.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from ckptconv import hf_to_megatron
from ckptconv.engine.reshard import reshard
from ckptconv.formats.megatron_dist import MegatronDistReader
from ckptconv.formats.megatron_dist_write import MegatronDistWriter
from mcore_dist_harness import has_integrity_check, megatron_dist_logits
from tiny_models import hf_logits, tokens

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LOADS = [(1, 1), (2, 1), (1, 2), (2, 2)]
# each model is converted once, at a layout that differs from most of the layouts it is loaded at
CONVERTED_AT = {"llama-gqa": (1, 1), "qwen2": (2, 2), "llama-tied": (1, 2)}


@pytest.fixture(scope="module")
def converted(hf_model_dir, tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            tp, pp = CONVERTED_AT[variant]
            out = tmp_path_factory.mktemp(f"dist-{variant}") / "mg"
            hf_to_megatron(hf_model_dir(variant), out, tp=tp, pp=pp, show_progress=False)
            cache[variant] = out
        return cache[variant]

    return get


def diff_vs_hf(mg, hf_dir, **layout) -> float:
    ids = tokens(vocab=250)
    ref = hf_logits(hf_dir, ids)
    # our output carries integrity.json: where megatron-core can check it (0.17.1+), it does
    got = megatron_dist_logits(mg, ids, verify_integrity=has_integrity_check(), **layout)
    assert got.shape == ref.shape
    return (got - ref).abs().max().item()


@pytest.mark.parametrize("variant", list(CONVERTED_AT))
@pytest.mark.parametrize("tp,pp", LOADS, ids=[f"load-tp{t}pp{p}" for t, p in LOADS])
def test_megatron_core_loads_torch_dist_at_any_layout(hf_model_dir, converted, variant, tp, pp):
    assert diff_vs_hf(converted(variant), hf_model_dir(variant), tp=tp, pp=pp) < 1e-4


def test_virtual_pipeline_load(hf_model_dir, converted):
    assert diff_vs_hf(converted("llama-gqa"), hf_model_dir("llama-gqa"), tp=1, pp=2, vpp=2) < 1e-4


def test_reshard_of_real_per_rank_fixture_loads(tmp_path):
    """Megatron's own per-rank torch files -> our torch_dist at TP1 -> real Megatron at TP2 PP1."""
    src = FIXTURES / "megatron_torch_tp2pp2"
    reshard(src, tmp_path / "dist", ckpt_format="torch_dist", tp=1, pp=1, show_progress=False)
    ref = load_file(src / "reference_logits.safetensors")
    got = megatron_dist_logits(tmp_path / "dist", ref["tokens"], tp=2, pp=1)
    assert (got - ref["logits"]).abs().max().item() < 1e-4


def test_swapped_k_v_fails_the_same_check(hf_model_dir, converted, tmp_path):
    """Negative control: k and v rows of query group 1 of layer 1 swapped in the stored qkv."""
    src = converted("llama-gqa")
    with MegatronDistReader(src) as r:
        metas = list(r.tensors().values())
        with MegatronDistWriter(tmp_path / "bad", r.layout, metas, args=r.args, iteration="release",
                                impl=r.impl, tie_copy=False, extra=r.meta) as w:
            for m in metas:
                t = r.read(m.name)
                if m.name == "decoder.layers.1.self_attention.linear_qkv.weight":
                    d, per = 8, 2
                    g = (per + 2) * d
                    k, v = slice(g + per * d, g + per * d + d), slice(g + per * d + d, 2 * g)
                    t = t.clone()
                    t[k], t[v] = r.read(m.name)[v], r.read(m.name)[k]
                w.write(m.name, t)
    assert diff_vs_hf(tmp_path / "bad", hf_model_dir("llama-gqa"), tp=2, pp=1) > 1e-3
