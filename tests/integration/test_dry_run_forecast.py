"""--dry-run forecasts time, memory and size; from a config alone for models not on disk.

The config-only plans are checked against parameter counts computed here from the config's
numbers (not through ckptconv's tables), and the family tables' expected HF tensors against
what transformers itself saves for every tiny model variant.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ckptconv.families import family_for_hf
from ckptconv.formats.hf import HFReader
from ckptconv.plan.expected_tensors import expected_hf_tensors
from helpers import run
from tiny_models import VARIANTS

CONFIGS = Path(__file__).resolve().parents[2] / "fixtures" / "configs"


def dense_params(c: dict) -> int:
    h, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attention = h * q + 2 * h * kv + q * h
    return 2 * v * h + h + L * (attention + 3 * h * f + 2 * h)


def moe_params(c: dict) -> int:
    h, L, v, hd = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attention = h * q + 2 * h * kv + q * h + 2 * hd          # + q/k norms
    dense = len(c["mlp_only_layers"])
    experts = c["num_experts"] * (h + 3 * h * c["moe_intermediate_size"])     # router row + 3 matrices each
    return 2 * v * h + h + L * (attention + 2 * h) + dense * 3 * h * c["intermediate_size"] + (L - dense) * experts


@pytest.mark.parametrize("name,params,expect,layout", [
    ("llama3-70b.json", dense_params, 70.55e9, ["--tp", "8", "--pp", "4"]),
    ("llama3-405b.json", dense_params, 405.85e9, ["--tp", "8", "--pp", "9", "--ckpt-format", "torch"]),
    ("qwen3-moe-deepseek-v3-size.json", moe_params, 672.3e9, ["--tp", "2", "--pp", "1", "--ep", "8"]),
])
def test_config_only_dry_run_forecasts_size_memory_and_time(tmp_path, name, params, expect, layout):
    cfg = json.loads((CONFIGS / name).read_text())
    n = params(cfg)
    assert abs(n - expect) / expect < 0.002
    r = run("hf-to-megatron", CONFIGS / name, tmp_path / "out", *layout, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["bytes_read"] == 2 * n                  # bf16
    assert s["bytes_written"] >= s["bytes_read"]     # + vocab padding rows
    assert s["bytes_written"] - s["bytes_read"] < 2 * 2 * 1024 * cfg["hidden_size"]
    tp = int(layout[layout.index("--tp") + 1])
    padded = -(-cfg["vocab_size"] // (128 * tp)) * 128 * tp
    assert s["padded_vocab_size"] == padded
    assert s["largest_tensor_bytes"] == 2 * padded * cfg["hidden_size"]       # the embedding
    # every tensor streams by rows: the forecast is the byte budget, not 4x the embedding
    assert s["largest_whole_tensor_bytes"] == 0
    assert s["memory_forecast_bytes"] == 256 << 20 < s["largest_tensor_bytes"]
    fc = s["time_forecast"]
    assert s["time_forecast_s"] == pytest.approx(sum(fc["parts_s"].values()), abs=0.05)
    # the bytes must at least be read and written at the measured rates
    rates, parts = fc["rates"], fc["parts_s"]
    body = s["time_forecast_s"] - parts["startup"] - parts["pieces"]
    assert body >= 0.999 * s["bytes_read"] / rates["read_Bps"]
    assert body >= 0.999 * s["bytes_written"] / max(rates["write_Bps"], rates["disk_write_Bps"])
    assert parts["startup"] >= rates["startup_s"] - 0.01
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []            # the calibration file is gone too


def test_config_only_directory_and_refusal_without_dry_run(tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text((CONFIGS / "llama3-70b.json").read_text())
    r = run("hf-to-megatron", d, tmp_path / "out", "--tp", "8", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "time forecast ~" in r.output and "131.4 GiB" in r.output
    r = run("hf-to-megatron", d, tmp_path / "out", "--tp", "8")
    assert r.exit_code == 2 and "no weights found" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_expected_tensors_are_what_transformers_saves(hf_model_dir, variant):
    with HFReader(hf_model_dir(variant, torch.bfloat16)) as r:
        family = family_for_hf(r.config())
        cfg = family.from_hf_config(r.config())
        saved = {k: m for k, m in r.tensors().items()
                 if not any(re.search(p, k) for p in family.ignore_hf)
                 and not (k == "lm_head.weight" and cfg.tie_embeddings)}
    if any(".experts.gate_up_proj" in k or k.endswith(".experts.down_proj") for k in saved):
        pytest.skip("transformers 5 packs experts; the hub layout is per expert")
    assert expected_hf_tensors(family, cfg, torch.bfloat16) == saved


def test_megatron_to_hf_and_reshard_dry_runs_forecast_time(hf_model_dir, tmp_path):
    r = run("hf-to-megatron", hf_model_dir("llama-gqa"), tmp_path / "mg", "--tp", 2, "--pp", 2)
    assert r.exit_code == 0, r.output
    for args in (["megatron-to-hf", tmp_path / "mg", tmp_path / "hf"],
                 ["reshard", tmp_path / "mg", tmp_path / "rs", "--tp", 4, "--pp", 1]):
        r = run(*args, "--dry-run", "--json")
        assert r.exit_code == 0, r.output
        s = json.loads(r.output)
        assert s["time_forecast_s"] > 0 and s["time_forecast"]["work"]["bytes_written"] == s["bytes_written"]
        assert s["time_forecast"]["rates"]["startup_s"] >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mg"]
