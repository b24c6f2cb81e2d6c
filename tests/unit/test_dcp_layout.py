"""Where the model is among a DCP checkpoint's keys (metadata only, no tensors)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptconv.errors import MissingTensors, UnsupportedFamily
from ckptconv.formats import torchtitan_names as tt
from ckptconv.formats.dcp_layout import resolve_layout, split_keys

W = Path("/x/.metadata")
HF = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]


def test_planner_data_paths_decide_the_wrapper():
    keys = [f"model.{k}" for k in HF] + ["optim.state.model.embed_tokens.weight.exp_avg", "optim.state.lm_head.weight.step"]
    planner = {f"model.{k}": ("model", k) for k in HF}
    planner.update({k: tuple(k.split(".", 2)[:2]) + (k.split(".", 2)[2],) for k in keys if k.startswith("optim")})
    for pd in (planner, None):          # the same answer from the paths and from the anchor's prefix
        mk = split_keys(keys, pd, W)
        assert (mk.naming, mk.wrapper) == ("hf", "model.")
        assert mk.names == {k: f"model.{k}" for k in HF}
        assert sorted(mk.other) == ["optim"] and len(mk.other["optim"]) == 2


def test_wrapper_components_are_dropped_and_model_only_keeps_training_groups_out():
    keys = ["_orig_mod.model.embed_tokens.weight", "_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight",
            "_orig_mod.lm_head.weight", "lr_scheduler.last_epoch"]
    mk = split_keys(keys, None, W)
    assert sorted(mk.names) == ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    assert mk.other == {"lr_scheduler": ["lr_scheduler.last_epoch"]}


def test_torchtitan_top_level_names():
    keys = ["tok_embeddings.weight", "layers.0.attention.qkv_linear.wq.weight", "norm.weight",
            "optimizer.state.layers.0.attention.qkv_linear.wqkv.weight.exp_avg", "train_state.step"]
    mk = split_keys(keys, None, W)
    assert mk.naming == "torchtitan" and mk.wrapper == ""
    assert sorted(mk.names) == ["layers.0.attention.qkv_linear.wq.weight", "norm.weight", "tok_embeddings.weight"]
    assert tt.to_hf_name("layers.3.attention.wq.weight") == ("model.layers.3.self_attn.q_proj.weight", "q")
    assert tt.from_hf_name("model.layers.3.mlp.up_proj.weight") == ("layers.3.feed_forward.w3.weight", None)


@pytest.mark.parametrize("keys,error,text", [
    (["optim.state.x.exp_avg"], MissingTensors, "no model tensors"),
    (["encoder.blocks.0.w"], UnsupportedFamily, "unknown parameter naming"),
    (["a.model.embed_tokens.weight", "b.model.embed_tokens.weight"], UnsupportedFamily, "several models"),
])
def test_refusals(keys, error, text):
    with pytest.raises(error, match=text):
        split_keys(keys, None, W)


def test_rope_permutation_is_its_own_inverse_and_moves_rows():
    w = torch.arange(8 * 2 * 6, dtype=torch.float32).reshape(16, 6)
    hf = tt.rope_to_hf(w, 2)
    assert torch.equal(tt.rope_from_hf(hf, 2), w) and not torch.equal(hf, w)
    # head 0, HF row j (first half) is torchtitan row 2j; second half row 4 + j is 2j + 1
    assert torch.equal(hf[:4], w[0:8:2]) and torch.equal(hf[4:8], w[1:8:2])


def test_layouts(tmp_path):
    for d in ("run/checkpoint/step-10", "run/checkpoint/step-200", "acc/pytorch_model_fsdp_0", "acc/optimizer_0", "plain"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / ".metadata").write_bytes(b"")
    lay = resolve_layout(tmp_path / "run")
    assert (lay.kind, lay.step, lay.model_dir.name) == ("torchtitan", 200, "step-200")
    assert resolve_layout(tmp_path / "run" / "checkpoint", 10).model_dir.name == "step-10"
    acc = resolve_layout(tmp_path / "acc")
    assert acc.kind == "accelerate" and acc.optim_dir.name == "optimizer_0"
    assert resolve_layout(tmp_path / "plain").kind == "plain"
    (tmp_path / "plain" / "metadata.json").write_text("{}")       # Megatron's torch_dist, not ours
    assert resolve_layout(tmp_path / "plain") is None
