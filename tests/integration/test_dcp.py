"""torch DCP training checkpoints written by real FSDP2 jobs (2 gloo ranks, CPU, tiny seeded
Llama, a few AdamW steps; tests/fsdp2_jobs.py) -> HF / Megatron, and HF -> DCP loaded back into a
2-rank FSDP2 model with dcp.load + set_model_state_dict. References: the full state dict the job
held, the live sharded model's logits, transformers' logits, torch's own DCP loader."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fsdp2_jobs import run_job
from helpers import assert_same_hf, hf_tensors, one_line_error, run, tree_hash
from tiny_models import hf_logits

VARIANTS = {"untied": "llama-gqa", "tied": "llama-tied"}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def job(request, tmp_path_factory):
    """One trained FSDP2 job: model_only/ and model_optim/ DCP saves, full.safetensors, logits.pt, config/."""
    out = run_job(tmp_path_factory.mktemp(f"fsdp2-{request.param}"), VARIANTS[request.param], steps=3)
    return request.param, out


def _from_pretrained_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    return hf_logits(hf_dir, ids)


@pytest.mark.parametrize("save", ["model_only", "model_optim"])
def test_fsdp2_to_hf_is_the_jobs_state_and_logits(job, save, tmp_path):
    variant, out = job
    res = run("dcp-to-hf", out / save, tmp_path / "hf", "--hf-config", out / "config")
    assert res.exit_code == 0, res.output
    full = hf_tensors(out)      # full.safetensors: what the job held (gathered)
    got = hf_tensors(tmp_path / "hf")
    tied = variant == "tied"
    assert sorted(got) == sorted(n for n in full if not (tied and n == "lm_head.weight"))
    for n, t in got.items():
        assert t.dtype == full[n].dtype and torch.equal(t, full[n]), n
    if save == "model_optim":
        assert "skipped training state: optim" in res.output and "pickled items (not read)" in res.output
    live = torch.load(out / "logits.pt")
    # the same weights and the same kernels: from_pretrained's logits are the live sharded model's, exactly
    assert torch.equal(_from_pretrained_logits(tmp_path / "hf", live["tokens"]), live["logits"])


def test_inspect_lists_optimizer_and_pickled_items(job):
    _, out = job
    res = run("inspect", out / "model_optim", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["format"] == "dcp" and info["naming"] == "hf" and info["wrapper"] == "model."
    optim = info["training_state"]["optim"]
    assert optim["tensors"] > 0 and any(k.startswith("optim.param_groups.0.") for k in optim["pickled"])
    assert all(not n.startswith("optim") for n in info["tensors"])


def test_fsdp2_to_megatron_tp2pp2_to_hf_bit_exact(job, tmp_path):
    variant, out = job
    assert run("dcp-to-megatron", out / "model_optim", tmp_path / "mg", "--tp", 2, "--pp", 2,
               "--hf-config", out / "config").exit_code == 0
    assert run("megatron-to-hf", tmp_path / "mg", tmp_path / "hf").exit_code == 0
    full, got = hf_tensors(out), hf_tensors(tmp_path / "hf")
    for n, t in got.items():
        assert torch.equal(t, full[n]), n
    assert set(full) - set(got) <= ({"lm_head.weight"} if variant == "tied" else set())
    # verify: the DCP checkpoint against the Megatron one (exact), through the same family tables
    cfg_copy = tmp_path / "dcp"
    shutil.copytree(out / "model_only", cfg_copy)
    shutil.copy(out / "config" / "config.json", cfg_copy / "config.json")
    res = run("verify", cfg_copy, tmp_path / "mg")
    assert res.exit_code == 0 and "equivalent" in res.output, res.output


def test_verify_dcp_detects_a_changed_weight(job, tmp_path):
    _, out = job
    assert run("dcp-to-hf", out / "model_only", tmp_path / "hf", "--hf-config", out / "config").exit_code == 0
    f = next((tmp_path / "hf").glob("*.safetensors"))
    from safetensors.torch import load_file, save_file
    sd = load_file(f)
    sd["model.norm.weight"] = sd["model.norm.weight"].clone()
    sd["model.norm.weight"][3] += 1e-3
    save_file(sd, f, metadata={"format": "pt"})
    res = run("verify", out / "model_only", tmp_path / "hf", "--hf-config", out / "config")
    assert res.exit_code == 1 and "model.norm.weight" in res.output, res.output


def test_hf_to_dcp_loads_into_fsdp2_and_round_trips(hf_model_dir, tmp_path):
    hf = hf_model_dir("llama-tied")
    assert run("hf-to-dcp", hf, tmp_path / "dcp").exit_code == 0
    assert run("hf-to-dcp", hf, tmp_path / "dcp_model", "--state-dict-key", "model").exit_code == 0
    # HF -> DCP -> HF is bit-exact (config too, which the DCP dir carries)
    assert run("dcp-to-hf", tmp_path / "dcp", tmp_path / "back").exit_code == 0
    assert_same_hf(hf, tmp_path / "back")
    # a real 2-rank FSDP2 model loads it with dcp.load + set_model_state_dict; its logits are transformers'
    for name, key in (("dcp", None), ("dcp_model", "model")):
        job = run_job(tmp_path / f"load_{name}", "llama-tied", load=tmp_path / name, key=key)
        live = torch.load(job / "logits.pt")
        assert torch.equal(live["logits"], hf_logits(hf, live["tokens"]))


def test_torchtitan_naming_round_trip_is_exact_and_permutes(hf_model_dir, tmp_path):
    hf = hf_model_dir("llama-gqa")
    assert run("hf-to-dcp", hf, tmp_path / "tt", "--naming", "torchtitan").exit_code == 0
    import torch.distributed.checkpoint.format_utils as fu
    fu.dcp_to_torch_save(tmp_path / "tt", tmp_path / "tt.pt")      # torch's own reader
    sd = torch.load(tmp_path / "tt.pt")
    src = hf_tensors(hf)
    assert "layers.0.attention.qkv_linear.wq.weight" in sd and "tok_embeddings.weight" in sd
    assert torch.equal(sd["layers.0.attention.qkv_linear.wv.weight"], src["model.layers.0.self_attn.v_proj.weight"])
    assert not torch.equal(sd["layers.0.attention.qkv_linear.wq.weight"], src["model.layers.0.self_attn.q_proj.weight"])
    res = run("dcp-to-hf", tmp_path / "tt", tmp_path / "back")
    assert res.exit_code == 0 and "torchtitan names" in res.output
    assert_same_hf(hf, tmp_path / "back")


def test_run_reruns_a_dcp_checkpoint(job, tmp_path):
    _, out = job
    live = torch.load(out / "logits.pt")
    toks = " ".join(str(int(t)) for t in live["tokens"][0])
    res = run("run", out / "model_optim", "--tokens", toks, "--hf-config", out / "config", "--nproc", 1,
              "--json", tmp_path / "r.json", "--save-logits", tmp_path / "l.safetensors")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file
    # the bundled runtime is other code (its own layers): close, not bit-equal
    assert torch.allclose(load_file(tmp_path / "l.safetensors")["logits"][0], live["logits"][0], atol=1e-4)


# ------------------------------------------------------------------ bad input: exit 2, one line
def _save_plain(path: Path, sd: dict) -> None:
    import warnings
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(path), no_dist=True)


def test_bad_inputs(hf_model_dir, tmp_path):
    hf = hf_model_dir("llama-gqa")
    cfg = hf / "config.json"
    _save_plain(tmp_path / "optim_only", {"optim": {"state": {"x": {"exp_avg": torch.zeros(3)}}}})
    one_line_error(run("dcp-to-hf", tmp_path / "optim_only", tmp_path / "o1", "--hf-config", cfg),
                   "no model tensors", "optim_only", "Fix:")
    _save_plain(tmp_path / "alien", {"encoder": {"blocks.0.w": torch.zeros(3)}})
    one_line_error(run("dcp-to-hf", tmp_path / "alien", tmp_path / "o2", "--hf-config", cfg),
                   "unknown parameter naming", "alien", "Fix:")
    assert run("hf-to-dcp", hf, tmp_path / "good").exit_code == 0
    trunc = tmp_path / "truncated"
    shutil.copytree(tmp_path / "good", trunc)
    victim = sorted(trunc.glob("*.distcp"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    before = tree_hash(trunc)
    one_line_error(run("dcp-to-hf", trunc, tmp_path / "o3"), "truncated", victim.name, "Fix:")
    one_line_error(run("verify", trunc, hf), "truncated", victim.name)
    assert tree_hash(trunc) == before
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()


def test_accelerate_fsdp2_save_state_to_hf(tmp_path_factory, tmp_path):
    pytest.importorskip("accelerate")
    out = run_job(tmp_path_factory.mktemp("accelerate"), "llama-gqa", steps=2, mode="accelerate")
    state = out / "state"
    assert (state / "pytorch_model_fsdp_0" / ".metadata").is_file() and (state / "optimizer_0" / ".metadata").is_file()
    info = json.loads(run("inspect", state, "--json").output)
    assert info["layout"] == "accelerate" and info["training_state"]["optimizer"]["tensors"] > 0
    assert any(f.startswith("random_states_") for f in info["other_files"])
    res = run("dcp-to-hf", state, tmp_path / "hf", "--hf-config", out / "config")
    assert res.exit_code == 0, res.output
    full, got = hf_tensors(out), hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(full) and all(torch.equal(got[n], full[n]) for n in full)
    live = torch.load(out / "logits.pt")
    assert torch.equal(hf_logits(tmp_path / "hf", live["tokens"]), live["logits"])
