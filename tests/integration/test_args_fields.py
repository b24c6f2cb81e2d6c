"""Issue 18.8 end to end: a checkpoint real megatron-core saved with an args field that changes
the function (Phi-3-style partial rotary, rotary_percent=0.5) is never read as a plain Llama."""
from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from ckptconv.formats.megatron_dist_layout import COMMON_ITEM
from helpers import one_line_error, run, tree_hash
from safe_load import load_megatron_file, save_megatron_file
from test_fixture_args import _RawBytes

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "megatron_torch_tp2pp2"
LISTS = FIXTURE.parent / "megatron_args"
ARGS_016 = json.loads((LISTS / "megatron_lm_args.json").read_text())["fields"]
ARGS_019 = json.loads((LISTS / "megatron_lm_args_0.19.json").read_text())["fields"]


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


FIXTURE_019 = FIXTURE.parent / "megatron019_dist_tp1"      # written by real megatron-core 0.19.2


def with_args_019(tmp_path, **fields) -> Path:
    """A copy of the megatron-core 0.19.2 fixture whose common state's args hold ``fields``: saved as
    ITER_DIR/common.pt, which megatron-core 0.19 itself reads in preference to the common_state item."""
    dst = tmp_path / "mg019"
    shutil.copytree(FIXTURE_019, dst)
    (iter_dir,) = dst.glob("iter_*")
    planner = _RawBytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({COMMON_ITEM: io.BytesIO()}, storage_reader=dcp.FileSystemReader(str(iter_dir)),
                 planner=planner, no_dist=True)
    (common,) = load_megatron_file(io.BytesIO(planner.raw[COMMON_ITEM]))
    for k, v in fields.items():
        assert hasattr(common["args"], k), k             # a field megatron-core 0.19 saved
        setattr(common["args"], k, v)
    save_megatron_file(common, iter_dir / "common.pt")
    return dst


# fields Megatron-LM core_v0.19 added (absent from 0.16.1's parser) that change the function
NEW_IN_019 = {"use_mup": True, "mup_output_mult": 0.25, "hybrid_layer_pattern": "M*M*",
              "moe_mlp_glu_interleave_size": 32, "yarn_original_max_position_embeddings": 4096}


@pytest.mark.parametrize("field", sorted(NEW_IN_019))
def test_019_only_field_at_non_default_is_refused(tmp_path, field):
    assert field not in ARGS_016 and field in ARGS_019
    src = with_args_019(tmp_path, **{field: NEW_IN_019[field]})
    before = tree_hash(src)
    one_line_error(run("megatron-to-hf", src, tmp_path / "hf"), field, "Fix:")
    assert not (tmp_path / "hf").exists() and tree_hash(src) == before
    control = with_args_019(tmp_path / "control", **{field: ARGS_019[field]["default"]})
    assert run("megatron-to-hf", control, tmp_path / "hf-control").exit_code == 0


def test_quantile_balancing_router_is_refused(tmp_path):
    """0.19's moe_router_load_balancing_type=quantile_balancing routes on logits - qb_beta: a
    routing rule, not only a loss."""
    src = with_args_019(tmp_path, moe_router_load_balancing_type=["quantile_balancing"])
    one_line_error(run("megatron-to-hf", src, tmp_path / "hf"), "moe_router_load_balancing_type")
