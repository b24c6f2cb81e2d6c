"""Issue 18.1: a downcast that makes a finite value non-finite is refused by every conversion
(exit 2 naming the tensor, its max |value| and the dtype's range) unless --allow-nonfinite, and
`verify` counts such values as differences, always (value walk, slow path and fingerprints)."""
from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from helpers import one_line_error, run

UP = "model.layers.1.mlp.up_proj.weight"


def big_bf16(hf_model_dir, tmp_path, value=2.0 ** 20):
    """A bf16 tiny Llama with one weight of ``value`` (finite in bf16, Inf in fp16)."""
    src = tmp_path / "big"
    shutil.copytree(hf_model_dir("llama-gqa", torch.bfloat16), src)
    sd = load_file(src / "model.safetensors")
    sd[UP][3, 5] = value
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_conversions_refuse_overflowing_cast(hf_model_dir, tmp_path):
    src = big_bf16(hf_model_dir, tmp_path)
    for cmd in (("hf-to-megatron", src, tmp_path / "mg", "--dtype", "fp16"),
                ("hf-to-megatron", src, tmp_path / "mg", "--dtype", "fp16", "--ckpt-format", "torch", "--tp", 2)):
        one_line_error(run(*cmd), "up_proj", "overflows", "1.04858e+06", "65504", "--allow-nonfinite")
        assert not (tmp_path / "mg").exists()
    assert run("hf-to-megatron", src, tmp_path / "mg", "--ckpt-format", "torch").exit_code == 0   # bf16: fits
    one_line_error(run("megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--dtype", "fp16"),
                   "up_proj", "overflows", "65504")
    assert not (tmp_path / "hf").exists()
    r = run("hf-to-megatron", src, tmp_path / "mg16", "--dtype", "fp16", "--allow-nonfinite")
    assert r.exit_code == 0, r.output


def test_verify_counts_overflow_as_difference(hf_model_dir, tmp_path):
    src = big_bf16(hf_model_dir, tmp_path)
    assert run("hf-to-megatron", src, tmp_path / "mg16", "--dtype", "fp16", "--allow-nonfinite",
               "--tp", 2).exit_code == 0
    assert run("megatron-to-hf", tmp_path / "mg16", tmp_path / "hf16", "--allow-nonfinite").exit_code == 0
    assert torch.isinf(load_file(tmp_path / "hf16" / "model.safetensors")[UP][3, 5])
    for b in (tmp_path / "mg16", tmp_path / "hf16"):          # Megatron space and HF space
        r = run("verify", src, b, "--json", "-")
        assert r.exit_code == 1, r.output
        rep = json.loads(r.stdout)
        bad = [t for t in rep["tensors"] if t["status"] == "differs"]
        assert [t["name"] for t in bad] in ([UP], ["decoder.layers.1.mlp.linear_fc1.weight"]), bad
        assert bad[0]["n_diff"] == 1 and "Inf/NaN" in bad[0]["detail"] and "65504" in bad[0]["detail"], bad
        # tolerances never accept an overflow
        assert run("verify", src, b, "--atol", "1e9").exit_code == 1
    # fingerprints: the output's manifest (fp16 hashes) against the bf16 source
    r = run("fingerprint", tmp_path / "hf16", "-o", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    r = run("verify", src, tmp_path / "m.json")
    assert r.exit_code == 1 and "overflow" in r.output, r.output


def test_verify_exact_fp16_cast_still_passes(hf_model_dir, tmp_path):
    """The check does not reject a correct downcast (values within fp16 range)."""
    src = hf_model_dir("llama-gqa", torch.bfloat16)
    assert run("hf-to-megatron", src, tmp_path / "mg", "--dtype", "fp16").exit_code == 0
    r = run("verify", src, tmp_path / "mg")
    assert r.exit_code == 0, r.output
