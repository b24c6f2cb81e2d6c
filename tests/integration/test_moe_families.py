"""Mixtral, Qwen2-MoE (shared expert + gate, dense and sparse layers mixed) and Qwen3-MoE (q/k
norm): HF -> Megatron (TP/PP/EP/ETP, both formats, SequentialMLP and grouped-GEMM names) -> HF is
bit-exact in fp32 and bf16; reshard across EP is bit-exact; the args say what Megatron needs to
rebuild the model; checkpoints real megatron-core saved at EP 2 convert to HF and match the
logits megatron computed; verify names the layer and expert of a swapped, duplicated, missing or
1-ulp-altered expert."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptconv import hf_to_megatron, megatron_to_hf
from ckptconv.engine.reshard import reshard
from ckptconv.formats.detect import detect_format
from ckptconv.formats.megatron import open_megatron_reader
from helpers import assert_same_hf, one_line_error, run
from tiny_models import hf_logits

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.mark.parametrize("variant,fmt,kw,dtype", [
    ("mixtral", "torch", dict(tp=2, pp=2, ep=2), torch.float32),
    ("mixtral", "torch_dist", dict(tp=1, pp=1, ep=4), torch.bfloat16),
    ("qwen2-moe", "torch", dict(tp=2, pp=1, ep=2, etp=2, moe_grouped_gemm=True), torch.float32),
    ("qwen2-moe", "torch_dist", dict(tp=1, pp=2, ep=2), torch.bfloat16),
    ("qwen3-moe", "torch", dict(tp=1, pp=2, ep=4), torch.bfloat16),
    ("qwen3-moe", "torch_dist", dict(tp=2, pp=1, ep=2), torch.float32),
])
def test_round_trip_bit_exact(hf_model_dir, tmp_path, variant, fmt, kw, dtype):
    src = hf_model_dir(variant, dtype)
    hf_to_megatron(src, tmp_path / "mg", ckpt_format=fmt, show_progress=False, **kw)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", show_progress=False)
    assert_same_hf(src, tmp_path / "hf")
    if kw.get("moe_grouped_gemm"):
        names = torch.load(next((tmp_path / "mg").glob("*/mp_rank_01_001/model_optim_rng.pt")),
                           weights_only=False)["model"]
        assert "decoder.layers.1.mlp.experts.linear_fc1.weight1" in names
        assert not any(".local_experts." in n for n in names)


def test_args_carry_what_megatron_needs(hf_model_dir, tmp_path):
    hf_to_megatron(hf_model_dir("qwen2-moe"), tmp_path / "mg", ckpt_format="torch", ep=2, show_progress=False)
    with open_megatron_reader(tmp_path / "mg", "megatron_torch") as r:
        a = r.args
        experts = sum(1 for n in r.tensors() if ".local_experts." in n)
    assert (a.num_experts, a.moe_router_topk, a.moe_ffn_hidden_size, a.moe_router_pre_softmax) == (4, 2, 48, True)
    assert (a.moe_shared_expert_intermediate_size, a.moe_shared_expert_gate) == (40, True)
    assert a.moe_layer_freq == [0, 1, 1, 1] and a.ffn_hidden_size == 128
    assert (a.expert_model_parallel_size, a.expert_tensor_parallel_size, a.moe_grouped_gemm) == (2, 1, False)
    assert a.add_qkv_bias and not a.qk_layernorm
    assert experts == 3 * 4 * 2                       # layer 0 is dense (mlp_only_layers)


@pytest.mark.parametrize("variant", ["qwen2-moe", "mixtral"])
def test_reshard_across_ep_bit_exact(hf_model_dir, tmp_path, variant):
    src = hf_model_dir(variant)
    hf_to_megatron(src, tmp_path / "a", ckpt_format="torch", tp=2, pp=2, ep=2, show_progress=False)
    reshard(tmp_path / "a", tmp_path / "b", ckpt_format="torch_dist", ep=4, tp=1, pp=1, show_progress=False)
    reshard(tmp_path / "b", tmp_path / "c", ckpt_format="torch", ep=1, tp=2, pp=1, show_progress=False)
    with open_megatron_reader(tmp_path / "a", "megatron_torch") as ra:
        for d in ("b", "c"):
            with open_megatron_reader(tmp_path / d, detect_format(tmp_path / d)) as rb:
                assert sorted(rb.tensors()) == sorted(ra.tensors())
                for name in ra.tensors():
                    assert torch.equal(ra.read(name), rb.read(name)), (d, name)
    megatron_to_hf(tmp_path / "c", tmp_path / "hf", show_progress=False)
    assert_same_hf(src, tmp_path / "hf")


@pytest.mark.parametrize("ckpt,ref", [
    ("megatron_moe_torch_ep2", "megatron_moe_torch_ep2"),
    ("megatron_moe_tp2pp2ep2/torch", "megatron_moe_tp2pp2ep2"),
    ("megatron_moe_tp2pp2ep2/torch_dist", "megatron_moe_tp2pp2ep2"),
])
def test_checkpoint_real_megatron_saved_at_ep2_converts_to_hf(tmp_path, ckpt, ref):
    """Args only (no HF config carried): the family is recognised as Mixtral from the MoE args."""
    summary = megatron_to_hf(FIXTURES / ckpt, tmp_path / "hf", show_progress=False)
    assert summary["family"] == "mixtral"
    r = load_file(FIXTURES / ref / "reference_logits.safetensors")
    assert (hf_logits(tmp_path / "hf", r["tokens"]) - r["logits"]).abs().max().item() < 1e-4


def test_inspect_hf_moe(hf_model_dir):
    res = run("inspect", hf_model_dir("qwen3-moe"))
    assert res.exit_code == 0 and "family=qwen3_moe" in res.output, res.output


@pytest.fixture
def mixtral_pair(hf_model_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_model_dir("mixtral"), src)
    hf_to_megatron(src, tmp_path / "mg", ckpt_format="torch", ep=2, show_progress=False)
    return src, tmp_path / "mg"


def _edit_hf(src: Path, fn) -> None:
    path = src / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


W = "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"


def test_verify_names_swapped_and_altered_experts(mixtral_pair):
    src, mg = mixtral_pair

    def edit(sd):
        a, b = W.format(l=2, e=1, w="w2"), W.format(l=2, e=3, w="w2")
        sd[a], sd[b] = sd[b].clone(), sd[a].clone()
        x = sd[W.format(l=1, e=0, w="w1")].view(-1)
        x[5] = torch.nextafter(x[5], torch.tensor(1.0))
    _edit_hf(src, edit)
    res = run("verify", src, mg)
    assert res.exit_code == 1, res.output
    assert "layer 2 experts 1 and 3 swapped (linear_fc2.weight)" in res.output
    assert "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight" in res.output
    assert "layer 1 expert 0 linear_fc1" in res.output and "n_diff=1/" in res.output


def test_verify_names_a_duplicated_expert(mixtral_pair):
    """B (here the edited HF copy) holds expert 0 twice, in place of expert 2."""
    src, mg = mixtral_pair

    def edit(sd):
        for w in ("w1", "w3", "w2"):
            sd[W.format(l=3, e=2, w=w)] = sd[W.format(l=3, e=0, w=w)].clone()
    _edit_hf(src, edit)
    res = run("verify", mg, src)
    assert res.exit_code == 1, res.output
    assert "layer 3 expert 2 duplicates expert 0 (linear_fc1.weight)" in res.output
    assert "layer 3 expert 2 duplicates expert 0 (linear_fc2.weight)" in res.output


def test_missing_expert_is_named(mixtral_pair, tmp_path):
    src, mg = mixtral_pair
    _edit_hf(src, lambda sd: sd.pop(W.format(l=1, e=3, w="w2")))
    res = run("verify", src, mg)
    assert res.exit_code == 1, res.output
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight: missing_in_a" in res.output
    one_line_error(run("hf-to-megatron", src, tmp_path / "out"), W.format(l=1, e=3, w="w2"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opts,needle", [
    (["--ep", "3"], "num_experts=4 is not divisible by EP=3"),
    (["--etp", "2"], "ETP=2 does not divide TP=1"),
    (["--ep", "8"], "num_experts=4 is not divisible by EP=8"),
])
def test_bad_expert_layouts_are_refused(hf_model_dir, tmp_path, opts, needle):
    one_line_error(run("hf-to-megatron", hf_model_dir("mixtral"), tmp_path / "out", *opts), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe"])
def test_packed_transformers5_experts_read_as_the_hub_layout(tmp_path, variant):
    """Files holding the in-memory packed experts (mlp.experts.gate_up_proj [E, 2I, H], down_proj
    [E, H, I], router mlp.gate) convert to exactly what transformers' own save_pretrained writes."""
    from ckptconv.engine.convert import source_to_hf
    from ckptconv.formats.hf import HFReader
    from tiny_models import build_model

    model = build_model(variant)
    hub, packed = tmp_path / "hub", tmp_path / "packed"
    model.save_pretrained(hub)
    packed.mkdir()
    sd = {k: t.contiguous() for k, t in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd) and not any(".experts.0." in k for k in sd)
    save_file(sd, packed / "model.safetensors", metadata={"format": "pt"})
    (packed / "config.json").write_text((hub / "config.json").read_text())
    hf_to_megatron(packed, tmp_path / "mg", ckpt_format="torch", ep=2, show_progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", show_progress=False)
    assert_same_hf(hub, tmp_path / "back")
    with HFReader(packed) as r:
        source_to_hf(r, tmp_path / "hubout", show_progress=False)
    assert_same_hf(hub, tmp_path / "hubout")
