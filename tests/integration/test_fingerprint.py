"""Fingerprint manifests: independent of format, TP/PP and sharding; written by conversions;
`verify CKPT manifest.json` checks a checkpoint without the source at hand."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptconv import hf_to_megatron, megatron_to_hf
from ckptconv.verify.manifest import MANIFEST_NAME
from helpers import run

MANIFEST = MANIFEST_NAME


def fingerprint(path, *extra):
    r = run("fingerprint", path, *extra)
    assert r.exit_code == 0, r.output
    return r.stdout


def verify_json(a, b):
    r = run("verify", a, b, "--json", "-")
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


def test_manifest_is_independent_of_format_and_layout(hf_model_dir, tmp_path):
    src = hf_model_dir("qwen2")
    ref = fingerprint(src)
    data = json.loads(ref)
    assert data["format"] == "ckptconv-manifest" and data["num_tensors"] == 3 + 4 * 12
    emb = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    assert data["tensors"]["model.embed_tokens.weight"] == {
        "shape": [250, 64], "dtype": "float32", "sha256": hashlib.sha256(emb.numpy().tobytes()).hexdigest()}
    for i, (tp, pp, vpp, impl) in enumerate([(1, 1, None, "transformer_engine"), (2, 2, 2, "local"),
                                              (2, 1, None, "transformer_engine")]):
        mg = tmp_path / f"mg{i}"
        hf_to_megatron(src, mg, tp=tp, pp=pp, vpp=vpp, impl=impl, ckpt_format="torch", show_progress=False)
        assert (mg / MANIFEST).read_text() == ref            # written by the conversion while streaming
        assert fingerprint(mg) == ref                         # recomputed from the Megatron files
        megatron_to_hf(mg, tmp_path / f"hf{i}", max_shard_size="50KB", show_progress=False)
        assert (tmp_path / f"hf{i}" / MANIFEST).read_text() == ref
        assert (tmp_path / f"hf{i}" / "model.safetensors.index.json").is_file()
    # the manifest file in a checkpoint directory is not mistaken for a tensor or a config
    code, report = verify_json(src, tmp_path / "hf1")
    assert code == 0 and report["num_failed"] == 0


def test_torch_dist_output_has_the_same_manifest(hf_model_dir, tmp_path):
    from ckptconv.formats.megatron import WRITERS
    if "torch_dist" not in WRITERS:
        pytest.skip("torch_dist writer not available")
    src = hf_model_dir("llama-gqa")
    hf_to_megatron(src, tmp_path / "dist", tp=2, pp=2, ckpt_format="torch_dist", show_progress=False)
    assert (tmp_path / "dist" / MANIFEST).read_text() == fingerprint(src) == fingerprint(tmp_path / "dist")
    code, report = verify_json(src, tmp_path / "dist")
    assert code == 0 and report["layout"] == "megatron"


def test_bf16_conversion_manifest_and_verify_against_it(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-tied")
    hf_to_megatron(src, tmp_path / "mg", pp=2, dtype=torch.bfloat16, ckpt_format="torch", show_progress=False)
    manifest = tmp_path / "mg" / MANIFEST
    data = json.loads(manifest.read_text())
    assert {t["dtype"] for t in data["tensors"].values()} == {"bfloat16"} and "lm_head.weight" not in data["tensors"]
    code, report = verify_json(src, manifest)                # fp32 source vs the bf16 output's hashes
    assert code == 0 and {t["status"] for t in report["tensors"]} == {"equal", "rounded"}
    r = run("fingerprint", tmp_path / "mg", "-o", tmp_path / "again.json")
    assert r.exit_code == 0 and (tmp_path / "again.json").read_text() == manifest.read_text()
    code, report = verify_json(tmp_path / "again.json", manifest)
    assert code == 0


def test_verify_against_manifest_catches_and_explains(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    (tmp_path / "m.json").write_text(fingerprint(src))
    bad = shutil.copytree(src, tmp_path / "bad")
    sd = load_file(bad / "model.safetensors")
    g, u = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    sd[g], sd[u] = sd[u], sd[g]
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1e-6
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    code, report = verify_json(bad, tmp_path / "m.json")
    assert code == 1
    failed = {t["name"]: t for t in report["tensors"] if t["status"] != "equal"}
    assert set(failed) == {g, u, "model.norm.weight"}
    assert failed[g]["diagnosis"] == "layer 1 gate_proj/up_proj: gate and up swapped"
    assert failed["model.norm.weight"]["detail"] == "fingerprint differs"


def test_pipeline_offset_named_against_manifest(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    (tmp_path / "m.json").write_text(fingerprint(src))
    mg = tmp_path / "mg"
    hf_to_megatron(src, mg, pp=2, ckpt_format="torch", show_progress=False)
    stage0 = mg / "release" / "mp_rank_00_000" / "model_optim_rng.pt"
    stage1 = mg / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        s0, s1 = torch.load(stage0, weights_only=True), torch.load(stage1, weights_only=True)
    for k, v in list(s1["model"].items()):         # stage 1 local layer 0 := global layer 1
        if k.startswith("decoder.layers.0.") and torch.is_tensor(v):
            s1["model"][k] = s0["model"][k.replace("layers.0.", "layers.1.")].clone()
    torch.save(s1, stage1)
    code, report = verify_json(mg, tmp_path / "m.json")
    assert code == 1 and "pipeline stage 1 layers offset by 1: A's layer 2 holds B's layer 1" in report["diagnoses"]


def test_bad_manifest_is_an_input_error(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    (tmp_path / "m.json").write_text('{"format": "ckptconv-manifest", "version": 1, "hash": "sha256"')
    r = run("verify", src, tmp_path / "m.json")
    assert r.exit_code == 2 and "manifest is not valid JSON" in r.output and "m.json" in r.output
    r = run("verify", src, tmp_path / "m.json", "--logits")
    assert r.exit_code == 2
    (tmp_path / "ok.json").write_text(fingerprint(src))
    r = run("verify", src, tmp_path / "ok.json", "--logits")
    assert r.exit_code == 2 and "--logits needs two checkpoints" in r.output
    r = run("fingerprint", tmp_path / "ok.json")
    assert r.exit_code == 2 and "already a manifest" in r.output
