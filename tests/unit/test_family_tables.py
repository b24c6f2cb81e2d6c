"""Generated from the tables: every op of every family's rules is exactly invertible on
tensors of the shapes the config implies; HF config and Megatron args round trip through the
architecture features; windows are carried in Megatron's own args fields both ways."""
from __future__ import annotations

import pytest
import torch

from ckptconv.errors import UnsupportedFamily
from ckptconv.families import FAMILIES, config_from_hf, family_by_name
from ckptconv.formats.megatron_args import build_args, config_from_args, window_args, windows_from_args
from ckptconv.ops import OPS, OpContext, get_op
from ckptconv.plan.megatron_layout import MegatronLayout
from ckptconv.plan.megatron_shapes import logical_shape
from tiny_models import BASE, VARIANTS


def hf_config(variant: str) -> dict:
    import transformers
    cls_name, over = VARIANTS[variant]
    from tiny_models import NO_BASE
    cfg = getattr(transformers, cls_name)(**{**({} if cls_name in NO_BASE else BASE), **over})
    cfg.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    return cfg.to_dict()


def args_of(cfg):
    return build_args(cfg, MegatronLayout(1, 1, cfg.num_layers), padded_vocab=256, divisible_by=128,
                      dtype=torch.float32, impl="local", iteration=0)




@pytest.mark.parametrize("variant", ["llama-gqa", "llama-tied", "mistral", "qwen2", "qwen3", "phi3", "gpt2",
                                     "mistral-window", "qwen2-window", "gemma2", "gemma3"])
def test_every_rule_op_inverts_exactly(variant):
    cfg = config_from_hf(hf_config(variant))
    ctx = OpContext(cfg, 256)
    family = family_by_name(cfg.family)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for m in family.expand(cfg):
        op = get_op(m.op)
        shape = logical_shape(m.megatron, cfg, 256)
        hf_shapes = op.inverse_shapes(shape, ctx)
        assert len(hf_shapes) == len(m.hf), m
        xs = [torch.randn(s, generator=g) for s in hf_shapes]
        if m.op == "vocab":
            xs = [x[: cfg.vocab_size] for x in xs]
        t = op.forward(xs, ctx)
        assert tuple(t.shape) == tuple(shape) == tuple(op.forward_shape([x.shape for x in xs], ctx)), m
        back = op.inverse(t, ctx)
        assert all(torch.equal(a, b) for a, b in zip(back, xs)), m
        seen.add(m.op)
    assert seen <= set(OPS)


def test_fused_ops_are_not_plain_concatenation():
    cfg = config_from_hf(hf_config("gpt2"))
    ctx = OpContext(cfg, 256)
    w = torch.randn(64, 192)                               # Conv1D c_attn [in, out]
    fused = get_op("qkv_fused_t").forward([w], ctx)
    assert not torch.equal(fused, w.t())                   # per-head interleave, not [Q; K; V]
    assert torch.equal(fused[8:16], w.t()[64:72])          # head 0: q rows 0..7, then k rows 0..7


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2", "qwen3", "phi3", "gpt2", "mistral-window",
                                     "qwen2-window", "gemma2", "gemma3"])
def test_args_round_trip_without_hf_config(variant):
    """Megatron args alone (no carried HF config) give back the same family and architecture."""
    cfg = config_from_hf(hf_config(variant))
    back = config_from_args(args_of(cfg))
    assert back.family == cfg.family and back == cfg
    hf = family_by_name(back.family).to_hf_config(back)
    assert config_from_hf(hf) == cfg


def test_windows_are_megatron_args():
    mistral = config_from_hf(hf_config("mistral-window"))
    a = args_of(mistral)
    assert a.window_size == (4, 0) and a.window_attn_skip_freq is None     # W=5: attend to delta <= 4
    qwen2 = args_of(config_from_hf(hf_config("qwen2-window")))
    assert qwen2.window_size == (4, 0) and qwen2.window_attn_skip_freq == [0, 0, 1, 1]
    hf = family_by_name("qwen2").to_hf_config(config_from_args(qwen2))
    assert hf["use_sliding_window"] and hf["sliding_window"] == 5 and hf["max_window_layers"] == 2
    assert family_by_name("mistral").to_hf_config(config_from_args(a))["sliding_window"] == 5


def test_alternating_window_pattern_uses_megatron_skip_frequency():
    alt = (5, None, 5, None, 5, None)              # Gemma 2: every 2nd layer (1-based) is full
    assert window_args(alt) == {"window_size": (4, 0), "window_attn_skip_freq": 2}
    g3 = (7,) * 5 + (None,) + (7,) * 5 + (None,)   # Gemma 3: 5 sliding, 1 full
    assert window_args(g3)["window_attn_skip_freq"] == 6
    for w in (alt, g3, (None, 5, 5, None)):
        a = type("A", (), window_args(w))()
        assert windows_from_args(a, len(w)) == w


def test_gemma_args_record_what_megatron_core_lacks():
    g2 = args_of(config_from_hf(hf_config("gemma2")))
    assert g2.layernorm_zero_centered_gamma and g2.apply_layernorm_1p and g2.gated_linear_unit and g2.openai_gelu
    assert not g2.swiglu and g2.kv_channels == 16 and g2.softmax_scale == 24 ** -0.5
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (0.02, 3.0, 24.0)
    assert g2.window_size == (4, 0) and g2.window_attn_skip_freq == 2          # Gemma 2 alternates
    assert g2.ckptconv_sandwich_norms and g2.ckptconv_embedding_scale
    g3 = args_of(config_from_hf(hf_config("gemma3")))
    assert g3.qk_layernorm and (g3.rotary_base, g3.rope_local_base_freq) == (1e6, 1e4)
    assert g3.window_attn_skip_freq == 4 and g3.attn_logit_softcapping is None


def test_window_no_family_can_state_is_refused_naming_the_flag():
    cfg = config_from_hf(hf_config("llama-gqa"))
    a = args_of(cfg)
    a.window_size, a.window_attn_skip_freq = (4, 0), [1, 0, 1, 1]
    with pytest.raises(UnsupportedFamily, match="--hf-config"):
        config_from_args(a)


def test_registry_has_every_family_once():
    assert list(FAMILIES) == ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma2", "gemma3",
                             "mixtral", "qwen2_moe", "qwen3_moe"]
    for f in FAMILIES.values():
        assert len({m for m in f.hf_architectures}) == len(f.hf_architectures)


def test_families_doc_is_generated_from_the_tables():
    from pathlib import Path
    from ckptconv.families.doc import BEGIN, END, render
    text = (Path(__file__).resolve().parents[2] / "docs" / "families.md").read_text()
    assert text[text.index(BEGIN): text.index(END) + len(END)] == render(), \
        "docs/families.md is stale: run python -m ckptconv.families.doc"
