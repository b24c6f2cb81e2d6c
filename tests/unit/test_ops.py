"""Ops are pure and exactly invertible; their shape functions agree with the tensors."""
import pytest
import torch

from ckptconv.families import family_by_name
from ckptconv.ops import OpContext, get_op


def ctx(heads=8, kv=4, head_dim=8, vocab=250, padded=256):
    from ckptconv.families.schema import ModelConfig
    cfg = ModelConfig("llama", 2, 64, 128, heads, kv, head_dim, vocab, False, False, 1e-5, 1e4, 64)
    return OpContext(cfg, padded)


@pytest.mark.parametrize("heads,kv", [(8, 4), (8, 8), (8, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_roundtrip_and_group_layout(heads, kv, bias):
    c = ctx(heads, kv)
    d, h = 8, 64
    rest = () if bias else (h,)
    q, k, v = (torch.randn(n * d, *rest) for n in (heads, kv, kv))
    op = get_op("qkv")
    fused = op.forward([q, k, v], c)
    assert tuple(fused.shape) == op.forward_shape([q.shape, k.shape, v.shape], c)
    per = heads // kv
    g = kv - 1   # the last group: its q heads, then its k, then its v
    block = fused.view(kv, (per + 2) * d, *rest)[g]
    assert torch.equal(block[: per * d], q.view(kv, per * d, *rest)[g])
    assert torch.equal(block[per * d: per * d + d], k.view(kv, d, *rest)[g])
    assert torch.equal(block[per * d + d:], v.view(kv, d, *rest)[g])
    back = op.inverse(fused, c)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    assert [tuple(x.shape) for x in back] == op.inverse_shapes(fused.shape, c)


def test_gate_up_and_vocab_roundtrip():
    c = ctx()
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fused = get_op("gate_up").forward([gate, up], c)
    assert torch.equal(fused[:128], gate) and torch.equal(fused[128:], up)
    assert all(torch.equal(a, b) for a, b in zip(get_op("gate_up").inverse(fused, c), (gate, up)))
    emb = torch.randn(250, 64).to(torch.bfloat16)
    padded = get_op("vocab").forward([emb], c)
    assert padded.shape == (256, 64) and padded.dtype == torch.bfloat16 and not padded[250:].any()
    assert torch.equal(get_op("vocab").inverse(padded, c)[0], emb)


def test_families_extend_llama_without_copying():
    llama, qwen2, mistral = (family_by_name(n) for n in ("llama", "qwen2", "mistral"))
    assert qwen2.layer_rules[: len(llama.layer_rules)] == llama.layer_rules
    assert mistral.layer_rules == llama.layer_rules
    extra = [r.megatron for r in qwen2.layer_rules[len(llama.layer_rules):]]
    assert extra == ["decoder.layers.{i}.self_attention.linear_qkv.bias"]
