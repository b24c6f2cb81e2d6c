"""Plans and parallel layout from metadata alone (no tensors)."""
import pytest
import torch

from ckptconv.errors import LayoutError, MissingTensors
from ckptconv.families import config_from_hf, family_by_name
from ckptconv.plan.megatron_layout import MegatronLayout, pad_vocab_size, tp_kind, tp_pieces
from ckptconv.plan.planner import plan_hf_to_megatron
from ckptconv.types import TensorMeta

HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
      "num_key_value_heads": 4, "head_dim": 8, "vocab_size": 250, "rms_norm_eps": 1e-5}


def hf_metas(cfg, tied=False):
    L, H = cfg.num_layers, cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not tied:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (64, H), p + "self_attn.k_proj.weight": (32, H),
                       p + "self_attn.v_proj.weight": (32, H), p + "self_attn.o_proj.weight": (H, 64),
                       p + "mlp.gate_proj.weight": (128, H), p + "mlp.up_proj.weight": (128, H),
                       p + "mlp.down_proj.weight": (H, 128)})
    return {n: TensorMeta(n, s, torch.float32) for n, s in shapes.items()}


def test_plan_covers_every_source_tensor_once():
    cfg = config_from_hf(HF)
    plan = plan_hf_to_megatron(family_by_name("llama"), cfg, hf_metas(cfg), MegatronLayout(2, 2, 4), 256)
    used = [m.name for it in plan.items for m in it.hf]
    assert sorted(used) == sorted(hf_metas(cfg)) and len(used) == len(set(used))
    shapes = {it.megatron.name: it.megatron.shape for it in plan.items}
    assert shapes["decoder.layers.3.self_attention.linear_qkv.weight"] == (128, 64)
    assert shapes["embedding.word_embeddings.weight"] == (256, 64)
    s = plan.summary()
    assert s["layers_per_stage"] == [2, 2] and len(s["files"]) == 4
    assert s["bytes_read"] == sum(m.nbytes for m in hf_metas(cfg).values())


@pytest.mark.parametrize("tp,msg", [(8, "num_query_groups"), (3, "not divisible by TP=3")])
def test_divisibility_errors(tp, msg):
    cfg = config_from_hf(HF)
    with pytest.raises(LayoutError, match=msg):
        plan_hf_to_megatron(family_by_name("llama"), cfg, hf_metas(cfg), MegatronLayout(tp, 1, 4),
                            pad_vocab_size(250, 128, tp))


def test_layers_vs_pipeline_errors():
    cfg = config_from_hf(HF)
    with pytest.raises(LayoutError, match="divisible by PP x VPP"):
        plan_hf_to_megatron(family_by_name("llama"), cfg, hf_metas(cfg), MegatronLayout(1, 3, 4), 256)
    with pytest.raises(LayoutError, match="PP x VPP = 8"):
        plan_hf_to_megatron(family_by_name("llama"), cfg, hf_metas(cfg), MegatronLayout(1, 2, 4, vpp=4), 256)


def test_unexpected_and_missing_tensors():
    cfg = config_from_hf(HF)
    metas = hf_metas(cfg)
    extra = {**metas, "model.layers.0.self_attn.o_proj.bias": TensorMeta("x", (64,), torch.float32)}
    with pytest.raises(MissingTensors, match="o_proj.bias"):
        plan_hf_to_megatron(family_by_name("llama"), cfg, extra, MegatronLayout(1, 1, 4), 256)
    del metas["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(MissingTensors, match="up_proj"):
        plan_hf_to_megatron(family_by_name("llama"), cfg, metas, MegatronLayout(1, 1, 4), 256)


def test_shape_mismatch_with_config():
    cfg = config_from_hf({**HF, "num_key_value_heads": 2})
    with pytest.raises(LayoutError, match="k_proj"):
        plan_hf_to_megatron(family_by_name("llama"), cfg, hf_metas(config_from_hf(HF)), MegatronLayout(1, 1, 4), 256)


def test_vpp_and_uneven_layer_placement():
    lay = MegatronLayout(1, 2, 8, vpp=2)
    # chunk v of stage p holds global layers (v*pp + p)*2 .. +1
    assert lay.locate("decoder.layers.5.mlp.linear_fc2.weight").__dict__ == \
        {"pp_rank": 0, "chunk": 1, "local_name": "decoder.layers.1.mlp.linear_fc2.weight", "ep_rank": None}
    assert lay.global_name(1, 1, "decoder.layers.0.x") == "decoder.layers.6.x"
    assert lay.locate("output_layer.weight").pp_rank == 1 and lay.locate("output_layer.weight").chunk == 1
    uneven = MegatronLayout(1, 2, 3, first_stage_layers=1)
    assert uneven.stage_layer_counts() == [1, 2]
    assert uneven.locate("decoder.layers.1.x").local_name == "decoder.layers.0.x"


def test_tp_pieces_and_vocab_padding():
    assert pad_vocab_size(250, 128, 1) == 256 and pad_vocab_size(250, 128, 4) == 512
    assert pad_vocab_size(32000, 128, 8) == 32768
    assert tp_kind("decoder.layers.0.mlp.linear_fc1.weight") == "gated"
    assert tp_pieces("gated", (256, 64), 2, 1) == [(0, 64, 128), (0, 192, 256)]
    assert tp_pieces("row", (64, 128), 4, 3) == [(1, 96, 128)]
    assert tp_pieces("replicated", (64,), 4, 3) == [(0, 0, 64)]
    with pytest.raises(LayoutError):
        tp_kind("decoder.layers.0.self_attention.mystery.weight")
