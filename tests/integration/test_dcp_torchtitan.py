"""torchtitan naming checked against torchtitan's own Llama3StateDictAdapter (its to_hf / from_hf,
incl. the RoPE permutation of wq/wk). Skipped where torchtitan is not importable: torchtitan
0.3.0 pins other versions of this venv's packages and needs triton, so it is not in the test
extra; it imports with `pip install --no-deps --target DIR torchtitan==0.3.0 spmd_types==0.2.3
torch_checkpointing tyro docstring_parser einops triton` and PYTHONPATH=DIR (how this was run)."""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_same_hf, hf_tensors, run

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
