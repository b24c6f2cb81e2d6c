"""HF -> Megatron (TP, PP, VPP) -> HF is bit-exact for every family, layout, tie and dtype."""
from __future__ import annotations

import argparse

import pytest
import torch

from ckptconv import hf_to_megatron, megatron_to_hf
from ckptconv.formats.megatron_torch import MegatronTorchReader
from helpers import assert_same_hf, hf_tensors

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (4, 1, None), (2, 2, 2)]
MODELS = [("llama-gqa", torch.float32), ("llama-gqa", torch.bfloat16), ("llama-tied", torch.float32),
          ("llama-mha", torch.float32), ("mistral", torch.float32), ("qwen2", torch.float32),
          ("qwen2-tied", torch.bfloat16), ("llama3-rope", torch.float32)]


@pytest.mark.parametrize("variant,dtype", MODELS, ids=[f"{v}-{str(d)[6:]}" for v, d in MODELS])
@pytest.mark.parametrize("tp,pp,vpp", LAYOUTS, ids=[f"tp{t}pp{p}vpp{v}" for t, p, v in LAYOUTS])
def test_hf_megatron_hf_bit_exact(hf_model_dir, tmp_path, variant, dtype, tp, pp, vpp):
    src = hf_model_dir(variant, dtype)
    mg, back = tmp_path / "mg", tmp_path / "hf"
    hf_to_megatron(src, mg, tp=tp, pp=pp, vpp=vpp, ckpt_format="torch", show_progress=False)
    with MegatronTorchReader(mg) as r:
        assert (r.layout.tp, r.layout.pp, r.layout.vpp) == (tp, pp, vpp)
    megatron_to_hf(mg, back, show_progress=False)
    assert_same_hf(src, back, config=True)


def test_mqa_at_tp1_layouts(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-mqa")
    for i, (tp, pp) in enumerate([(1, 1), (1, 2)]):
        hf_to_megatron(src, tmp_path / f"mg{i}", tp=tp, pp=pp, show_progress=False)
        megatron_to_hf(tmp_path / f"mg{i}", tmp_path / f"hf{i}", show_progress=False)
        assert_same_hf(src, tmp_path / f"hf{i}", config=True)


def _rank_file(root, tp, pp, pp_size):
    d = f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"
    return root / "release" / d / "model_optim_rng.pt"


def test_rank_files_load_with_torch_and_have_megatron_layout(hf_model_dir, tmp_path):
    """Per-rank files are plain torch.save files with Megatron's local layout (checked by hand)."""
    src = hf_model_dir("qwen2")
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, impl="local", ckpt_format="torch", show_progress=False)
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    full = hf_tensors(src)
    with torch.serialization.safe_globals([argparse.Namespace]):
        r0 = torch.load(_rank_file(tmp_path / "mg", 0, 0, 2), weights_only=True)
        r3 = torch.load(_rank_file(tmp_path / "mg", 1, 1, 2), weights_only=True)
    assert r0["checkpoint_version"] == 3.0 and r0["args"].tensor_model_parallel_size == 2
    assert r0["args"].padded_vocab_size == 256 and r0["args"].vocab_size == 250
    m0, m3 = r0["model"], r3["model"]
    emb = m0["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 64) and torch.equal(emb, full["model.embed_tokens.weight"][:128])
    # rank (tp 1, pp 1): padded rows 250..255 are zero, local layer 0 is global layer 2
    out = m3["output_layer.weight"]
    assert torch.equal(out[:122], full["lm_head.weight"][128:]) and not out[122:].any()
    assert torch.equal(m3["decoder.layers.0.input_layernorm.weight"], full["model.layers.2.input_layernorm.weight"])
    # qkv of tp rank 1 = query group 2,3: [q(2 heads), k, v] per group
    q = full["model.layers.2.self_attn.q_proj.weight"].view(4, 16, 64)
    k = full["model.layers.2.self_attn.k_proj.weight"].view(4, 8, 64)
    v = full["model.layers.2.self_attn.v_proj.weight"].view(4, 8, 64)
    want = torch.cat([torch.cat([q[g], k[g], v[g]]) for g in (2, 3)])
    assert torch.equal(m3["decoder.layers.0.self_attention.linear_qkv.weight"], want)
    bq = full["model.layers.2.self_attn.q_proj.bias"].view(4, 16)
    assert torch.equal(m3["decoder.layers.0.self_attention.linear_qkv.bias"][:16], bq[2])
    # fc1 of tp rank 1 = cat(gate half 1, up half 1)
    gate = full["model.layers.2.mlp.gate_proj.weight"]
    up = full["model.layers.2.mlp.up_proj.weight"]
    assert torch.equal(m3["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[64:], up[64:]]))
    assert torch.equal(m3["decoder.layers.0.self_attention.linear_proj.weight"],
                       full["model.layers.2.self_attn.o_proj.weight"][:, 32:])
    assert m3["decoder.layers.0.mlp.linear_fc1._extra_state"] is None
    assert "output_layer._extra_state" in m3 and "embedding.word_embeddings.weight" not in m3


def test_transformer_engine_and_local_key_spaces(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    for impl, norm in (("transformer_engine", "self_attention.linear_qkv.layer_norm_weight"),
                       ("local", "input_layernorm.weight")):
        hf_to_megatron(src, tmp_path / impl, impl=impl, ckpt_format="torch", show_progress=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(_rank_file(tmp_path / impl, 0, 0, 1), weights_only=True)["model"]
        assert f"decoder.layers.0.{norm}" in sd
        with MegatronTorchReader(tmp_path / impl) as r:
            assert r.impl == impl
        megatron_to_hf(tmp_path / impl, tmp_path / f"{impl}-hf", show_progress=False)
        assert_same_hf(src, tmp_path / f"{impl}-hf", config=True)


def test_tied_embedding_copy_on_last_stage(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-tied")
    hf_to_megatron(src, tmp_path / "pp1", tp=2, ckpt_format="torch", show_progress=False)
    hf_to_megatron(src, tmp_path / "pp2", tp=2, pp=2, ckpt_format="torch", show_progress=False)
    with torch.serialization.safe_globals([argparse.Namespace]):
        pp1 = torch.load(_rank_file(tmp_path / "pp1", 1, 0, 1), weights_only=True)["model"]
        first = torch.load(_rank_file(tmp_path / "pp2", 1, 0, 2), weights_only=True)["model"]
        last = torch.load(_rank_file(tmp_path / "pp2", 1, 1, 2), weights_only=True)["model"]
    assert "output_layer.weight" not in pp1 and "output_layer._extra_state" in pp1
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])


def test_dtype_cast_and_logits(hf_model_dir, tmp_path):
    """--dtype bf16 casts every tensor (correctly rounded) and the HF output still runs."""
    from tiny_models import hf_logits, tokens

    src = hf_model_dir("llama-gqa")
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, dtype=torch.bfloat16, show_progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", show_progress=False)
    a, b = hf_tensors(src), hf_tensors(tmp_path / "hf")
    for n in a:
        assert b[n].dtype == torch.bfloat16 and torch.equal(b[n], a[n].to(torch.bfloat16)), n
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf32", dtype=torch.float32, show_progress=False)
    ids = tokens()
    diff = (hf_logits(src, ids) - hf_logits(tmp_path / "hf32", ids)).abs().max().item()
    assert 0 < diff < 0.05


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_megatron_read_slice_equals_narrowed_read(hf_model_dir, tmp_path, fmt):
    """read_slice(name, dim, a, b, out=) of both Megatron readers equals read(name).narrow for
    every TP piece (what verify walks), for slices spanning pieces, and lands in ``out``."""
    from ckptconv.formats.megatron import READERS
    from ckptconv.plan.megatron_layout import tp_kind, tp_pieces

    hf_to_megatron(hf_model_dir("llama-gqa"), tmp_path / "mg", tp=2, pp=2, ckpt_format=fmt, show_progress=False)
    with READERS["megatron_torch" if fmt == "torch" else "megatron_torch_dist"](tmp_path / "mg") as r:
        checked = viewed = 0
        for name, meta in r.tensors().items():
            full = r.read(name)
            kind = tp_kind(name)
            ranges = ([x for t in range(2) for x in tp_pieces(kind, meta.shape, 2, t, name)]
                      if kind != "replicated" else [(0, 0, meta.shape[0])])
            ranges.append((0, 1, meta.shape[0] - 1))                      # crosses piece borders
            if len(meta.shape) == 2:
                ranges.append((1, 1, meta.shape[1] - 1))
            for d, a, b in ranges:
                want = full.narrow(d, a, b - a)
                out = torch.empty(want.shape, dtype=meta.dtype)
                got = r.read_slice(name, d, a, b, out=out)
                assert torch.equal(got, want) and torch.equal(out, want), (name, d, a, b)
                assert torch.equal(r.read_slice(name, d, a, b), want)
                view = r.view_slice(name, d, a, b)           # zero-copy where one stored run holds it
                assert view is None or torch.equal(view, want), (name, d, a, b)
                viewed += view is not None
                checked += 1
        assert checked > 2 * len(r.tensors())      # TP pieces were walked, not just whole tensors
        assert viewed > len(r.tensors())
