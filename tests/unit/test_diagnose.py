"""Diagnosis is pure: synthetic tensors in, sentences out. Each known mistake is named; random
damage is only localised, never "explained" by a wrong hypothesis."""
from __future__ import annotations

import torch

from ckptconv.families.schema import ModelConfig
from ckptconv.ops import OpContext, get_op
from ckptconv.verify.diagnose import Context, diagnose, group_label
from ckptconv.verify.diagnose_layers import layer_offsets
from ckptconv.verify.diagnose_rows import _neighbour, rounding, spans, tp_shards, vocab_shift

CFG = ModelConfig(family="llama", num_layers=4, hidden_size=16, ffn_hidden_size=24, num_heads=8, num_kv_heads=4,
                  head_dim=4, vocab_size=50, tie_embeddings=False, qkv_bias=False, norm_eps=1e-5,
                  rope_theta=1e4, max_position_embeddings=64)
QKV = ("m.layers.3.self_attn.q_proj.weight", "m.layers.3.self_attn.k_proj.weight", "m.layers.3.self_attn.v_proj.weight")
G = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G).to(dtype)


def qkv():
    return [rnd(32, 16), rnd(16, 16), rnd(16, 16)]     # 8 q heads, 4 k, 4 v of head_dim 4


def explain(ctx, a, b):
    found, where = diagnose(ctx, a, b)
    return found, where


def test_kv_swapped_in_groups_and_whole():
    a = qkv()
    b = [x.clone() for x in a]
    for g in (1, 3):
        b[1][g * 4:(g + 1) * 4], b[2][g * 4:(g + 1) * 4] = a[2][g * 4:(g + 1) * 4], a[1][g * 4:(g + 1) * 4]
    found, _ = explain(Context("layer 3 qkv", "qkv", CFG, QKV), a, b)
    assert found == ["layer 3 qkv: query groups 1, 3 k and v rows swapped"]
    found, _ = explain(Context("layer 3 qkv", "qkv", CFG, QKV), a, [a[0], a[2], a[1]])
    assert found == ["layer 3 qkv: k and v swapped"]


def test_plain_concat_and_split_in_fused_layout():
    a = qkv()
    fused = get_op("qkv").forward(a, OpContext(CFG, 0))
    ctx = Context("layer 3 linear_qkv", "qkv", CFG, QKV, fused=True, tp_kind="column", tps=(1,))
    found, _ = explain(ctx, [fused], [torch.cat(a)])
    assert found and "fused as plain [Q; K; V]" in found[0]
    found, _ = explain(Context("l", "qkv", CFG, QKV), a, list(torch.split(fused, [32, 16, 16])))
    assert found and "split as plain [Q; K; V] rows" in found[0]


def test_heads_permuted_rope_interleave_and_mixed():
    a = qkv()
    perm = torch.arange(4).view(2, 2).t().reshape(-1)
    b = [a[0].view(8, 4, 16)[:, perm].reshape(32, 16), a[1].clone(), a[2]]
    found, _ = explain(Context("L", "qkv", CFG, QKV), a, b)
    assert found == ["L: q heads permuted by the RoPE interleave (each head's rows in interleaved-pair order "
                     "instead of rotate-half)"]
    b = [a[0][[*range(4, 8), *range(0, 4), *range(8, 32)]], a[1], a[2]]
    assert explain(Context("L", "qkv", CFG, QKV), a, b)[0] == ["L: q heads permuted (B heads 0, 1 hold A heads 1, 0)"]
    b = [torch.cat([a[1][:4], a[0][4:]]), a[1], a[2]]           # q head 0 holds k head 0
    found, _ = explain(Context("L", "qkv", CFG, QKV), a, b)
    assert found == ["L: B's q heads 0 hold A's heads k0 (q/k/v rows mixed up)"]


def test_gate_up_swapped_and_plain_tp_chunks():
    gate, up = rnd(24, 16), rnd(24, 16)
    parts = ("m.layers.0.mlp.gate_proj.weight", "m.layers.0.mlp.up_proj.weight")
    ctx = Context("layer 0 linear_fc1", "gate_up", CFG, parts, fused=True, tp_kind="gated", tps=(2,))
    found, _ = explain(ctx, [torch.cat([gate, up])], [torch.cat([up, gate])])
    assert found == ["layer 0 linear_fc1: gate and up swapped"]
    fused = torch.cat([gate, up])
    # rank r wrote a plain chunk of [gate; up]; a correct reader put its halves at gate_r / up_r
    wrong = torch.cat([fused[0:12], fused[24:36], fused[12:24], fused[36:48]])
    found, _ = explain(ctx, [fused], [wrong])
    assert found and "fc1 split over TP=2 as plain row chunks" in found[0]


def test_tp_shards_duplicated_swapped_and_padding_zeros_not_duplicates():
    ref = rnd(8, 4)
    dup = torch.cat([ref[:4], ref[:4]])
    assert tp_shards("x", "column", (2,), ref, dup)[0] == ["x: TP shard 1 duplicates shard 0 (TP=2)"]
    assert tp_shards("x", "row", (2,), ref, torch.cat([ref[:, 2:], ref[:, :2]], 1))[0] == \
        ["x: TP shards 0 and 1 swapped (TP=2)"]
    padded = torch.cat([rnd(4, 4), torch.zeros(4, 4)])           # rank 1 = padding rows only
    broken = torch.cat([torch.zeros(4, 4), torch.zeros(4, 4)])
    found, where = tp_shards("v", "vocab", (2,), padded, broken)
    assert found == [] and where == ["v: differences only in TP shard 0 of 2"]


def test_vocab_shift_both_ways_and_no_false_shift():
    ref = rnd(50, 8)
    assert vocab_shift(ref, torch.cat([torch.zeros(6, 8), ref])) == 6
    assert vocab_shift(ref, torch.cat([ref[3:], torch.zeros(3, 8)])) == -3
    assert vocab_shift(ref, rnd(50, 8)) is None
    ctx = Context("embed_tokens", "vocab", CFG, ("model.embed_tokens.weight",))
    found, _ = explain(ctx, [ref], [torch.cat([ref, torch.zeros(6, 8)])])
    assert found == ["embed_tokens: B keeps 6 vocab padding rows (50-55); the padding was not removed"]


def test_rounding_mistakes_named_correct_rounding_not():
    a = torch.tensor([1.0 + 2 ** -9, -(1.0 + 2 ** -9), 1.00390625 * 1.7, 3.0, -2.5e-3])
    rne = a.to(torch.bfloat16)
    assert rounding("t", a, rne) is None
    trunc = (a.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    msg = rounding("t", a, trunc)
    assert msg is not None and "rounded toward zero (truncated)" in msg
    tie = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])      # exact halfway cases in bf16
    away = _neighbour(tie.to(torch.bfloat16), tie)
    assert "ties rounded away from even" in rounding("t", tie, away)
    assert rounding("t", a, rnd(5, dtype=torch.bfloat16)) is None   # not a rounding problem
    x = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float16)
    up = _neighbour(x, torch.tensor([1.0, 2.0, -2.0]))
    assert up[0] > 0 and up[1] > 1 and up[2] < -1 and up.dtype == torch.float16


def test_random_damage_is_only_localised():
    a = qkv()
    b = [x.clone() for x in a]
    b[0][9, 3] += 1.0
    found, where = explain(Context("L", "qkv", CFG, QKV), a, b)
    assert found == [] and where == ["L: q differs in rows 9 of 32 (heads 2)"]


def test_layer_offsets_named_by_pattern():
    names = [f"m.layers.{i}.{p}" for i in range(4) for p in ("w", "u")]
    keys_a = {n: n for n in names}
    # pipeline stage 1 (layers 2, 3) holds A's layers 1, 2
    keys_b = {**keys_a, **{f"m.layers.{i}.{p}": f"m.layers.{i - 1}.{p}" for i in (2, 3) for p in ("w", "u")}}
    failing = [n for n in names if keys_a[n] != keys_b[n]]
    got = layer_offsets(failing, keys_a, keys_b, layers_a=4, layers_b=4, stage_of=lambda i: i // 2)
    assert set(got.values()) == {"pipeline stage 1 layers offset by 1: B's layers 2-3 hold A's layers 1-2"}
    got = layer_offsets(failing, keys_a, keys_b, layers_a=4, layers_b=4)
    assert set(got.values()) == {"layers 2-3 offset by 1: B's layers 2-3 hold A's layers 1-2"}
    keys_b = {f"m.layers.{i}.{p}": f"m.layers.{i + (i >= 1)}.{p}" for i in range(3) for p in ("w", "u")}
    failing = [n for n in keys_b if keys_a[n] != keys_b[n]]
    got = layer_offsets(failing, keys_a, keys_b, layers_a=4, layers_b=3, missing_in_b=["m.layers.3.w"])
    assert got["m.layers.3.w"] == got["m.layers.1.u"] == "layer 1 dropped: B's layers 1-2 hold A's layers 2-3"
    keys_a["m.layers.0.w"] = keys_a["m.layers.2.w"] = "same"          # ambiguous matches explain nothing
    assert layer_offsets(["m.layers.1.w"], keys_a, {"m.layers.1.w": "same"}, layers_a=4, layers_b=4) == {}


def test_labels_and_spans():
    assert group_label(("decoder.layers.3.self_attention.linear_qkv.weight",)) == "layer 3 linear_qkv"
    assert group_label(QKV) == "layer 3 q_proj/k_proj/v_proj"
    assert group_label(("model.layers.0.self_attn.q_proj.bias",)) == "layer 0 q_proj bias"
    assert spans([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
