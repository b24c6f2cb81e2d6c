"""torchtitan checkpoints against torchtitan itself: a real CheckpointManager step-N/ save of its
Llama3 model converts to HF whose transformers logits are torchtitan's own forward's, and it
loads our `hf-to-dcp --naming torchtitan` output; the naming and RoPE permutation equal its own
Llama3StateDictAdapter (to_hf / from_hf). Skipped where torchtitan is not importable: torchtitan
0.3.0 pins other versions of this venv's packages and needs triton, so it is not in the test
extra; it imports with `pip install --no-deps --target DIR torchtitan==0.3.0 spmd_types==0.2.3
torch_checkpointing tyro docstring_parser einops triton` and PYTHONPATH=DIR (how this was run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fsdp2_jobs import free_port
from helpers import assert_same_hf, hf_tensors, run
from tiny_models import hf_logits

adapter_mod = pytest.importorskip("torchtitan.models.llama3.state_dict_adapter")
rope_mod = pytest.importorskip("torchtitan.models.common.rope")


def _adapter(cfg: dict):
    """torchtitan's adapter for this HF config (only the fields its to_hf/from_hf read)."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = rope_mod.ComplexRoPE.Config(dim=head_dim, max_seq_len=cfg["max_position_embeddings"],
                                       theta=cfg.get("rope_theta", 10000.0))
    attn = SimpleNamespace(n_heads=heads, n_kv_heads=kv, head_dim=head_dim, rope=rope)
    layers = [SimpleNamespace(attention=attn)] * cfg["num_hidden_layers"]
    model_cfg = SimpleNamespace(layers=layers, dim=cfg["hidden_size"],
                                enable_weight_tying=bool(cfg.get("tie_word_embeddings")))
    return adapter_mod.Llama3StateDictAdapter(model_cfg, None)


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-tied"])
def test_torchtitan_names_match_torchtitans_adapter(hf_model_dir, tmp_path, variant):
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.format_utils as fu

    hf = hf_model_dir(variant)
    cfg = json.loads((hf / "config.json").read_text())
    adapter = _adapter(cfg)
    native = adapter.from_hf(dict(hf_tensors(hf)))
    # torchtitan's names saved by torch's own DCP writer (torchtitan stores model keys top-level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({k: v.contiguous() for k, v in native.items()}, checkpoint_id=str(tmp_path / "tt" / "step-10"), no_dist=True)
    res = run("dcp-to-hf", tmp_path / "tt", tmp_path / "hf", "--hf-config", hf)
    assert res.exit_code == 0 and "torchtitan step 10" in res.output and "torchtitan names" in res.output, res.output
    assert_same_hf(hf, tmp_path / "hf")                 # = HF weights, i.e. = adapter.to_hf(native)
    ref = adapter.to_hf(native)
    got = hf_tensors(tmp_path / "hf")
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[n], got[n]) for n in ref)
    # and the other way: our torchtitan-named DCP is what from_hf gives
    assert run("hf-to-dcp", hf, tmp_path / "ours", "--naming", "torchtitan").exit_code == 0
    fu.dcp_to_torch_save(tmp_path / "ours", tmp_path / "ours.pt")
    ours = torch.load(tmp_path / "ours.pt")
    assert sorted(ours) == sorted(native) and all(torch.equal(ours[n], native[n]) for n in native)


JOB = Path(__file__).resolve().parents[1] / "torchtitan_job.py"


def _job(out: Path, *args) -> dict:
    subprocess.run([sys.executable, str(JOB), str(out), "--port", str(free_port()), *map(str, args)], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True)
    return torch.load(out / "reference.pt")


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-tied"])
def test_torchtitan_checkpoint_to_hf_gives_its_logits(hf_model_dir, tmp_path, variant):
    hf_cfg = hf_model_dir(variant)              # the same sizes (tests/tiny_models.BASE), HF's config
    tied = variant == "llama-tied"
    ref = _job(tmp_path / "run", *(["--tied"] if tied else []))
    res = run("dcp-to-hf", tmp_path / "run", tmp_path / "hf", "--hf-config", hf_cfg)   # the folder holding checkpoint/
    assert res.exit_code == 0 and "torchtitan step 3" in res.output and "optimizer" in res.output, res.output
    got = hf_tensors(tmp_path / "hf")
    expected = _adapter(json.loads((hf_cfg / "config.json").read_text())).to_hf(ref["state"])
    assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in got)
    # transformers (rotate-half RoPE, SDPA) on our output = torchtitan (complex RoPE, flex attention)
    ours = hf_logits(tmp_path / "hf", ref["tokens"])
    assert (ours - ref["logits"]).abs().max() < 1e-5
    # calibration: without the RoPE permutation of wq the same check fails by orders of magnitude
    # (small here: torchtitan's init keeps q small, so attention is nearly uniform)
    from safetensors.torch import save_file
    broken = dict(got)
    for i in range(4):
        broken[f"model.layers.{i}.self_attn.q_proj.weight"] = ref["state"][f"layers.{i}.attention.qkv_linear.wq.weight"]
    save_file(broken, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert (hf_logits(tmp_path / "hf", ref["tokens"]) - ref["logits"]).abs().max() > 1e-3


def test_torchtitan_loads_hf_to_dcp(hf_model_dir, tmp_path):
    hf = hf_model_dir("llama-gqa")
    assert run("hf-to-dcp", hf, tmp_path / "tt", "--naming", "torchtitan").exit_code == 0
    ref = _job(tmp_path / "run", "--load", tmp_path / "tt")         # CheckpointManager initial_load_path
    expected = _adapter(json.loads((hf / "config.json").read_text())).from_hf(dict(hf_tensors(hf)))
    assert all(torch.equal(ref["state"][n], expected[n]) for n in expected)
    assert (ref["logits"] - hf_logits(hf, ref["tokens"])).abs().max() < 1e-5
