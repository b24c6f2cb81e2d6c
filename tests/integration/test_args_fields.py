"""Issue 18.8 end to end: a checkpoint real megatron-core saved with an args field that changes
the function (Phi-3-style partial rotary, rotary_percent=0.5) is never read as a plain Llama."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import one_line_error, run
from safe_load import load_megatron_file, save_megatron_file

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "megatron_torch_tp2pp2"


def with_args(tmp_path, **fields) -> Path:
    """A copy of the real-megatron fixture whose rank files' args hold ``fields`` (rotary has no
    weights: the files are what Megatron saves for a model trained with those args)."""
    dst = tmp_path / "mg"
    shutil.copytree(FIXTURE, dst)
    for f in dst.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        obj = load_megatron_file(f)
        for k, v in fields.items():
            setattr(obj["args"], k, v)
        save_megatron_file(obj, f)
    return dst


def test_partial_rotary_is_mapped_or_refused(tmp_path):
    src = with_args(tmp_path, rotary_percent=0.5)
    r = run("megatron-to-hf", src, tmp_path / "hf")
    if r.exit_code == 0:        # mapped: the HF config must say so
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        assert factor == 0.5 and cfg["architectures"] == ["Phi3ForCausalLM"], cfg
    else:
        one_line_error(r, "rotary_percent=0.5", "Fix:")
        assert not (tmp_path / "hf").exists()
    assert run("megatron-to-hf", FIXTURE, tmp_path / "hf-plain").exit_code == 0     # the control


def test_unmapped_field_refused_by_every_reader_of_the_function(tmp_path):
    src = with_args(tmp_path, squared_relu=True)
    one_line_error(run("megatron-to-hf", src, tmp_path / "hf"), "squared_relu")
    one_line_error(run("run", src, "--tokens", "1 2 3"), "squared_relu")
    assert run("megatron-to-hf", FIXTURE, tmp_path / "hf").exit_code == 0
    one_line_error(run("verify", tmp_path / "hf", src), "squared_relu")        # cross-framework
    r = run("verify", FIXTURE, src)              # Megatron vs Megatron: the args differ
    assert r.exit_code == 1 and "args.squared_relu" in r.output, r.output
    # reshard carries args verbatim: the function is unchanged, so it is allowed
    r = run("reshard", src, tmp_path / "re", "--ckpt-format", "torch", "--tp", 1, "--pp", 1)
    assert r.exit_code == 0, r.output
