"""Golden layouts, one per family, written by hand from the format facts (FORMATS.md
"Megatron-Core model" and "More dense families"), independently of ckptconv's tables: the
expected rows of each Megatron rank file are built here from the HF tensors with plain
slicing. A mapping that is wrong but self-consistent in both directions (e.g. plain [Q; K; V]
instead of the per-group interleave) passes every round trip and fails here.

Every model: 4 layers, hidden 64, vocab 250 (padded to 256 at TP 2), written at TP 2 x PP 2
with the local spec; rank (tp 1, pp 1) holds global layers 2, 3 as local 0, 1."""
from __future__ import annotations

import argparse

import pytest
import torch

from ckptconv import hf_to_megatron
from helpers import hf_tensors

L0 = "decoder.layers.0."


def rank_file(root, tp, pp):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(root / "release" / f"mp_rank_{tp:02d}_{pp:03d}" / "model_optim_rng.pt", weights_only=True)


@pytest.fixture
def written(hf_model_dir, tmp_path):
    def get(variant):
        src = hf_model_dir(variant)
        hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, impl="local", ckpt_format="torch", show_progress=False)
        first, last = rank_file(tmp_path / "mg", 1, 0), rank_file(tmp_path / "mg", 1, 1)
        return hf_tensors(src), first["model"], last["model"], last["args"]
    return get


def grouped_qkv(q, k, v, groups, per_group, d, keep):
    """Megatron's linear_qkv rows for query groups ``keep``: per group its q heads, its k, its v."""
    q, k, v = (x.reshape(groups, n * d, *x.shape[1:]) for x, n in ((q, per_group), (k, 1), (v, 1)))
    return torch.cat([torch.cat([q[g], k[g], v[g]]) for g in keep])


def check_vocab_rows(first, last, emb, head, tied):
    """TP rank 1 holds padded-vocab rows 128..255: real rows 128..249, then 6 zero rows."""
    for got, want in ((first["embedding.word_embeddings.weight"], emb[128:]),
                      (last["output_layer.weight"], emb[128:] if tied else head[128:])):
        assert got.shape == (128, 64) and torch.equal(got[:122], want) and not got[122:].any()


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral", "qwen2", "qwen3"])
def test_llama_like_layout(written, variant):
    """q/k/v grouped per query group (4 groups of 2 q heads), TP rank 1 = groups 2, 3; fc1 =
    [gate half 1; up half 1]; o_proj / down_proj split by columns; norms whole."""
    hf, first, last, args = written(variant)
    p = "model.layers.2."
    d = 16 if variant == "qwen3" else 8
    want = grouped_qkv(hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
                       hf[p + "self_attn.v_proj.weight"], 4, 2, d, (2, 3))
    assert torch.equal(last[L0 + "self_attention.linear_qkv.weight"], want)
    assert torch.equal(last[L0 + "self_attention.linear_proj.weight"], hf[p + "self_attn.o_proj.weight"][:, 4 * d:])
    gate, up = hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
    assert torch.equal(last[L0 + "mlp.linear_fc1.weight"], torch.cat([gate[64:], up[64:]]))
    assert torch.equal(last[L0 + "mlp.linear_fc2.weight"], hf[p + "mlp.down_proj.weight"][:, 64:])
    assert torch.equal(last[L0 + "input_layernorm.weight"], hf[p + "input_layernorm.weight"])
    assert torch.equal(last[L0 + "pre_mlp_layernorm.weight"], hf[p + "post_attention_layernorm.weight"])
    assert torch.equal(last["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    check_vocab_rows(first, last, hf["model.embed_tokens.weight"], hf.get("lm_head.weight"), False)
    assert args.kv_channels == d and args.num_query_groups == 4 and args.group_query_attention
    assert args.normalization == "RMSNorm" and args.swiglu and not args.add_bias_linear
    if variant == "qwen2":
        bias = grouped_qkv(hf[p + "self_attn.q_proj.bias"], hf[p + "self_attn.k_proj.bias"],
                           hf[p + "self_attn.v_proj.bias"], 4, 2, d, (2, 3))
        assert torch.equal(last[L0 + "self_attention.linear_qkv.bias"], bias) and args.add_qkv_bias
    else:
        assert L0 + "self_attention.linear_qkv.bias" not in last and not args.add_qkv_bias
    if variant == "qwen3":      # per-head norms [head_dim], whole on every TP rank
        assert torch.equal(last[L0 + "self_attention.q_layernorm.weight"], hf[p + "self_attn.q_norm.weight"])
        assert torch.equal(last[L0 + "self_attention.k_layernorm.weight"], hf[p + "self_attn.k_norm.weight"])
        assert last[L0 + "self_attention.q_layernorm.weight"].shape == (16,) and args.qk_layernorm
    else:
        assert not any("q_layernorm" in k for k in last) and not args.qk_layernorm


def test_phi3_layout(written):
    """qkv_proj = [Q (64 rows); K (32); V (32)], then grouped like Llama; gate_up_proj = [gate;
    up] (128 rows each), TP rank 1 holds [gate rows 64:128; up rows 64:128]."""
    hf, first, last, args = written("phi3")
    p = "model.layers.3."
    qkv = hf[p + "self_attn.qkv_proj.weight"]
    assert qkv.shape == (128, 64)
    want = grouped_qkv(qkv[:64], qkv[64:96], qkv[96:], 4, 2, 8, (2, 3))
    assert torch.equal(last["decoder.layers.1.self_attention.linear_qkv.weight"], want)
    gu = hf[p + "mlp.gate_up_proj.weight"]
    assert torch.equal(last["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gu[64:128], gu[192:]]))
    assert torch.equal(last["decoder.layers.1.mlp.linear_fc2.weight"], hf[p + "mlp.down_proj.weight"][:, 64:])
    check_vocab_rows(first, last, hf["model.embed_tokens.weight"], hf["lm_head.weight"], False)
    assert args.rotary_percent == 0.5 and args.swiglu


def test_gpt2_layout(written):
    """Conv1D weights are [in, out]: Megatron's are their transposes. c_attn^T = [Q; K; V]
    (8 heads of 8), interleaved per head (MHA: one head per group), TP rank 1 = heads 4..7,
    bias alike; fc1 is split in plain rows (no GLU halves); c_proj^T split by columns; the
    row-parallel biases, LayerNorm weights and biases and the position embeddings are whole."""
    hf, first, last, args = written("gpt2")
    p = "transformer.h.2."
    w = hf[p + "attn.c_attn.weight"]
    assert w.shape == (64, 192)
    wt, b = w.t(), hf[p + "attn.c_attn.bias"]
    want = grouped_qkv(wt[:64], wt[64:128], wt[128:], 8, 1, 8, range(4, 8))
    assert torch.equal(last[L0 + "self_attention.linear_qkv.weight"], want)
    assert torch.equal(last[L0 + "self_attention.linear_qkv.bias"], grouped_qkv(b[:64], b[64:128], b[128:], 8, 1, 8,
                                                                                  range(4, 8)))
    assert torch.equal(last[L0 + "self_attention.linear_proj.weight"], hf[p + "attn.c_proj.weight"].t()[:, 32:])
    assert torch.equal(last[L0 + "self_attention.linear_proj.bias"], hf[p + "attn.c_proj.bias"])
    assert torch.equal(last[L0 + "mlp.linear_fc1.weight"], hf[p + "mlp.c_fc.weight"].t()[128:])
    assert torch.equal(last[L0 + "mlp.linear_fc1.bias"], hf[p + "mlp.c_fc.bias"][128:])
    assert torch.equal(last[L0 + "mlp.linear_fc2.weight"], hf[p + "mlp.c_proj.weight"].t()[:, 128:])
    assert torch.equal(last[L0 + "mlp.linear_fc2.bias"], hf[p + "mlp.c_proj.bias"])
    for local, name in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
        for kind in ("weight", "bias"):
            assert torch.equal(last[f"{L0}{local}.{kind}"], hf[f"{p}{name}.{kind}"])
    for kind in ("weight", "bias"):
        assert torch.equal(last[f"decoder.final_layernorm.{kind}"], hf[f"transformer.ln_f.{kind}"])
    assert torch.equal(first["embedding.position_embeddings.weight"], hf["transformer.wpe.weight"])
    assert "embedding.position_embeddings.weight" not in last
    check_vocab_rows(first, last, hf["transformer.wte.weight"], None, True)     # tied: last stage's copy
    assert (args.normalization, args.position_embedding_type) == ("LayerNorm", "learned_absolute")
    assert args.add_bias_linear and not args.swiglu and args.openai_gelu and not args.group_query_attention


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_gemma_layout(written, variant):
    """Megatron-Bridge's names: post_attention_layernorm -> linear_proj.post_layernorm,
    pre_feedforward_layernorm -> linear_fc1.layer_norm_weight (local: pre_mlp_layernorm),
    post_feedforward_layernorm -> linear_fc2.post_layernorm; norm weights w stored as is (both
    compute x_hat * (1 + w)); q/k grouped as for Llama (head_dim 16); tied embeddings."""
    hf, first, last, args = written(variant)
    p = "model.layers.2."
    want = grouped_qkv(hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
                       hf[p + "self_attn.v_proj.weight"], 4, 2, 16, (2, 3))
    assert torch.equal(last[L0 + "self_attention.linear_qkv.weight"], want)
    for mg, name in (("input_layernorm", "input_layernorm"),
                     ("self_attention.linear_proj.post_layernorm", "post_attention_layernorm"),
                     ("pre_mlp_layernorm", "pre_feedforward_layernorm"),
                     ("mlp.linear_fc2.post_layernorm", "post_feedforward_layernorm")):
        assert torch.equal(last[f"{L0}{mg}.weight"], hf[f"{p}{name}.weight"]), mg
    gate, up = hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
    assert torch.equal(last[L0 + "mlp.linear_fc1.weight"], torch.cat([gate[64:], up[64:]]))
    check_vocab_rows(first, last, hf["model.embed_tokens.weight"], None, True)
    assert args.layernorm_zero_centered_gamma and args.gated_linear_unit and args.openai_gelu and not args.swiglu
    assert (L0 + "self_attention.q_layernorm.weight" in last) == (variant == "gemma3")
    if variant == "gemma3":
        assert torch.equal(last[L0 + "self_attention.q_layernorm.weight"], hf[p + "self_attn.q_norm.weight"])
