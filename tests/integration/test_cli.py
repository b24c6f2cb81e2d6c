"""The CLI: exit codes, one-line errors, --dry-run/--json, atomic outputs, hub ids, inspect, verify."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from helpers import one_line_error, run, tree_hash


def test_convert_both_ways_verify_and_inputs_untouched(hf_model_dir, tmp_path):
    src = hf_model_dir("qwen2")
    before = tree_hash(src)
    r = run("hf-to-megatron", src, tmp_path / "mg", "--tp", 2, "--pp", 2, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["tp"] == 2 and summary["padded_vocab_size"] == 256 and summary["tensors_written"] > 0
    mg_hash = tree_hash(tmp_path / "mg")
    r = run("megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--max-shard-size", "100KB")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    r = run("verify", src, tmp_path / "hf", "--json", tmp_path / "report.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["equivalent"] and report["num_failed"] == 0 and report["num_tensors"] > 30
    assert tree_hash(src) == before and tree_hash(tmp_path / "mg") == mg_hash


def test_dry_run_writes_nothing(hf_model_dir, tmp_path):
    r = run("hf-to-megatron", hf_model_dir("llama-gqa"), tmp_path / "mg", "--tp", 4, "--pp", 2, "--vpp", 2,
            "--dry-run", "--json", "--ckpt-format", "torch")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["layers_per_stage"] == [1, 1, 1, 1] and len(s["files"]) == 8
    assert s["memory_forecast_bytes"] < s["bytes_read"]
    assert not (tmp_path / "mg").exists()


def test_existing_destination_needs_overwrite(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    dst = tmp_path / "mg"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    one_line_error(run("hf-to-megatron", src, dst), "already exists", "--overwrite")
    assert (dst / "keep.txt").read_text() == "mine"
    r = run("hf-to-megatron", src, dst, "--overwrite")
    assert r.exit_code == 0 and not (dst / "keep.txt").exists()
    assert (dst / "latest_checkpointed_iteration.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args,needles", [
    (["--tp", "8"], ["num_query_groups", "TP=8", "Fix:"]),
    (["--pp", "3"], ["PP x VPP", "Fix:"]),
])
def test_layout_errors_exit_2(hf_model_dir, tmp_path, args, needles):
    one_line_error(run("hf-to-megatron", hf_model_dir("llama-gqa"), tmp_path / "mg", *args), *needles)
    assert not (tmp_path / "mg").exists()


def test_destination_inside_source_and_equal(hf_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama-gqa"), src)
    one_line_error(run("hf-to-megatron", src, src / "out"), "inside the source")
    one_line_error(run("hf-to-megatron", src, src, "--overwrite"), "destination is the source")
    assert not (src / "out").exists()


def test_unknown_architecture(hf_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama-gqa"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FancyNetForCausalLM"], "fancynet"
    (src / "config.json").write_text(json.dumps(cfg))
    one_line_error(run("hf-to-megatron", src, tmp_path / "mg"), "FancyNetForCausalLM", "config.json")


def test_nonfinite_weights_refused_unless_allowed(hf_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama-gqa"), src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    one_line_error(run("hf-to-megatron", src, tmp_path / "mg"), "NaN", "up_proj", "--allow-nonfinite")
    assert not (tmp_path / "mg").exists()
    assert run("hf-to-megatron", src, tmp_path / "mg", "--allow-nonfinite").exit_code == 0


def test_hub_repo_id_from_local_cache(hf_model_dir, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(hf_model_dir("llama-gqa"), snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    r = run("hf-to-megatron", "hf://tiny-org/tiny-llama", tmp_path / "mg", "--cache-dir", cache, "--tp", 2)
    assert r.exit_code == 0, r.output
    assert run("megatron-to-hf", tmp_path / "mg", tmp_path / "hf").exit_code == 0
    assert run("verify", hf_model_dir("llama-gqa"), tmp_path / "hf").exit_code == 0


def test_hf_config_option_for_checkpoints_without_one(hf_model_dir, tmp_path):
    src = hf_model_dir("mistral")
    assert run("hf-to-megatron", src, tmp_path / "mg", "--pp", 2).exit_code == 0
    shutil.rmtree(tmp_path / "mg" / "hf_assets")
    r = run("megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--hf-config", src / "config.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mistral"
    assert run("verify", src, tmp_path / "hf").exit_code == 0


def test_inspect_json(hf_model_dir, tmp_path):
    src = hf_model_dir("qwen2")
    info = json.loads(run("inspect", src, "--json").output)
    assert info["format"] == "hf" and info["family"] == "qwen2" and info["num_tensors"] == 3 + 4 * 12
    run("hf-to-megatron", src, tmp_path / "mg", "--tp", 2, "--pp", 2, "--vpp", 2, "--transformer-impl", "local",
        "--ckpt-format", "torch")
    info = json.loads(run("inspect", tmp_path / "mg", "--json").output)
    assert (info["tp"], info["pp"], info["vpp"], info["transformer_impl"]) == (2, 2, 2, "local")
    assert info["family"] == "qwen2" and info["padded_vocab_size"] == 256
    assert info["tensors"]["decoder.layers.3.self_attention.linear_qkv.weight"]["shape"] == [128, 64]
    one_line_error(run("inspect", tmp_path / "nothing"), "does not exist")


def test_verify_exits_1_on_swapped_k_v(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(bad / "model.safetensors")
    k, v = "model.layers.2.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight"
    sd[k], sd[v] = sd[v].clone(), sd[k].clone()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    r = run("verify", src, bad)
    assert r.exit_code == 1
    assert k in r.output and v in r.output and "NOT equivalent" in r.output


def test_numbered_iteration_and_broken_megatron_dirs(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    mg = tmp_path / "mg"
    assert run("hf-to-megatron", src, mg, "--tp", 2, "--pp", 2, "--iteration", 100, "--ckpt-format", "torch").exit_code == 0
    assert (mg / "latest_checkpointed_iteration.txt").read_text() == "100"
    assert (mg / "iter_0000100" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()
    assert run("megatron-to-hf", mg, tmp_path / "hf", "--iteration", 100).exit_code == 0
    one_line_error(run("megatron-to-hf", mg, tmp_path / "x", "--iteration", 7), "iter_0000007", "--iteration")
    shutil.rmtree(mg / "iter_0000100" / "mp_rank_01_001")
    one_line_error(run("megatron-to-hf", mg, tmp_path / "y"), "mp_rank_01_001", "tp 1, pp 1")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mixed_iterations_refused(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    run("hf-to-megatron", src, tmp_path / "a", "--tp", 2, "--iteration", 10, "--ckpt-format", "torch")
    run("hf-to-megatron", src, tmp_path / "b", "--tp", 2, "--iteration", 20, "--ckpt-format", "torch")
    shutil.copy(tmp_path / "b" / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt",
                tmp_path / "a" / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt")
    one_line_error(run("megatron-to-hf", tmp_path / "a", tmp_path / "hf"), "mixed iterations", "mp_rank_01")


def test_rope_scaling_megatron_cannot_express_is_refused(hf_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama3-rope"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"]["original_max_position_embeddings"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    one_line_error(run("hf-to-megatron", src, tmp_path / "mg"), "original_max_position_embeddings", "Fix:")
