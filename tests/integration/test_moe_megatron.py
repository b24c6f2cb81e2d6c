"""Mixture-of-Experts Megatron checkpoints written by REAL megatron-core 0.16.1 at EP 2
(fixtures/megatron_moe_*): EP read from args (never guessed from directory names), experts at
their global index, both formats agreeing, reshard across EP/ETP/TP/PP bit-exact and back to the
very files megatron-core wrote, and the bad-input contract for expert layouts."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckptconv.engine.reshard import reshard
from ckptconv.formats.megatron_dist import MegatronDistReader
from ckptconv.formats.megatron_torch import MegatronTorchReader
from helpers import one_line_error, rank_models, run
from safe_load import load_megatron_file, save_megatron_file

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
EP2 = FIXTURES / "megatron_moe_torch_ep2"                 # TP1 PP1 EP2: mp_rank_00_000, mp_rank_00_001
TORCH = FIXTURES / "megatron_moe_tp2pp2ep2" / "torch"     # TP2 PP2 EP2 (4 ranks)
DIST = FIXTURES / "megatron_moe_tp2pp2ep2" / "torch_dist"
X = "decoder.layers.{l}.mlp.experts.local_experts.{e}.linear_fc{k}.weight"


def _load(path: Path) -> dict:
    return load_megatron_file(path)


def test_ep_rank_directory_is_not_taken_for_a_pipeline_stage():
    """mp_rank_00_001 of a PP1 EP2 save is EP rank 1: it holds global experts 2 and 3 (local 0, 1)."""
    with MegatronTorchReader(EP2) as r:
        assert (r.layout.pp, r.layout.ep, r.layout.num_experts) == (1, 2, 4)
        rank1 = _load(EP2 / "iter_0000010" / "mp_rank_00_001" / "model_optim_rng.pt")["model"]
        for layer in range(4):
            for g in range(4):
                for k in (1, 2):
                    got = r.read(X.format(l=layer, e=g, k=k))
                    if g >= 2:
                        assert torch.equal(got, rank1[X.format(l=layer, e=g - 2, k=k)])
        assert r.layout.stage_layer_counts() == [4]
        names = r.tensors()
    assert sum(1 for n in names if ".local_experts." in n) == 4 * 4 * 2


def test_per_rank_and_torch_dist_saves_of_one_model_agree_exactly():
    """The same megatron-core model saved by megatron itself in both formats reads as the same
    logical tensors: per-rank files with local expert indices vs torch_dist's global expert axis."""
    with MegatronTorchReader(TORCH) as a, MegatronDistReader(DIST) as b:
        assert sorted(a.tensors()) == sorted(b.tensors())
        assert b.layout.num_experts == 4 and b.layout.ep == 2
        for name in a.tensors():
            assert torch.equal(a.read(name), b.read(name)), name
        experts = [a.read(X.format(l=0, e=g, k=1)) for g in range(4)]
    assert all(not torch.equal(experts[i], experts[j]) for i in range(4) for j in range(i))


@pytest.mark.parametrize("fmt,kw,dirs", [
    ("torch", dict(tp=1, pp=1, ep=1), ["mp_rank_00"]),
    ("torch", dict(tp=1, pp=2, ep=4), [f"mp_rank_00_{p:03d}_{e:03d}" for p in range(2) for e in range(4)]),
    ("torch", dict(tp=2, pp=1, ep=2, etp=2), ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]),
    ("torch_dist", dict(ep=4), None),
])
def test_reshard_across_ep_is_bit_exact_and_returns_to_megatrons_own_files(tmp_path, fmt, kw, dirs):
    out = tmp_path / "out"
    reshard(TORCH, out, ckpt_format=fmt, show_progress=False, **kw)
    if dirs is not None:
        assert sorted(p.name for p in (out / "iter_0000010").iterdir()) == sorted(dirs)
    with MegatronTorchReader(TORCH) as src, (MegatronTorchReader if fmt == "torch" else MegatronDistReader)(out) as r:
        assert (r.layout.ep, r.layout.etp) == (kw["ep"], kw.get("etp", 1))
        assert sorted(r.tensors()) == sorted(src.tensors())
        for name in src.tensors():
            assert torch.equal(r.read(name), src.read(name)), name
    back = tmp_path / "back"
    reshard(out, back, ckpt_format="torch", tp=2, pp=2, ep=2, etp=1, impl="local", show_progress=False)
    ours, theirs = rank_models(back), rank_models(TORCH)
    assert sorted(ours) == sorted(theirs)
    for rank, sd in theirs.items():
        assert sorted(ours[rank]) == sorted(sd), rank
        for k, v in sd.items():
            assert (v is None and ours[rank][k] is None) or torch.equal(ours[rank][k], v), (rank, k)


def test_dry_run_lists_the_files_of_every_ep_rank(tmp_path):
    res = run("reshard", TORCH, tmp_path / "o", "--ckpt-format", "torch", "--ep", "4", "--tp", "1", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "EP=2 ETP=1 (4 experts) -> megatron_torch" in res.output
    assert "TP=1 PP=2 VPP=None EP=4 ETP=1" in res.output
    assert not (tmp_path / "o").exists()


def test_inspect_shows_experts(tmp_path):
    res = run("inspect", DIST)
    assert res.exit_code == 0, res.output
    assert "experts: E=4 top-2 ffn 48 shared=none  EP=2 ETP=1 (2 per EP rank, global expert axis)" in res.output


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, fn) -> None:
    state = _load(path)
    fn(state["model"])
    save_megatron_file(state, path)


def test_experts_not_divisible_by_ep_is_refused(tmp_path):
    one_line_error(run("reshard", TORCH, tmp_path / "o", "--ep", "3"), "num_experts=4 is not divisible by EP=3",
                   "choose an EP that divides 4")
    assert not (tmp_path / "o").exists()


def test_missing_expert_tensor_names_file_and_tensor(tmp_path):
    ckpt = _copy(EP2, tmp_path)
    f = ckpt / "iter_0000010" / "mp_rank_00_001" / "model_optim_rng.pt"
    _edit(f, lambda sd: sd.pop("decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight"))
    res = run("reshard", ckpt, tmp_path / "o")
    one_line_error(res, "expert tensor(s) of 4 experts are absent", X.format(l=2, e=3, k=2), "mp_rank_00_001")
    assert not (tmp_path / "o").exists()


def test_mixed_expert_layouts_are_refused(tmp_path):
    ckpt = _copy(EP2, tmp_path)
    f = ckpt / "iter_0000010" / "mp_rank_00_001" / "model_optim_rng.pt"

    def to_grouped(sd):
        for j in (0, 1):
            for k in (1, 2):
                sd[f"decoder.layers.0.mlp.experts.linear_fc{k}.weight{j}"] = sd.pop(X.format(l=0, e=j, k=k))
    _edit(f, to_grouped)
    one_line_error(run("inspect", ckpt), "mixed expert layouts", "mp_rank_00_001",
                   "decoder.layers.0.mlp.experts.linear_fc")


def test_directory_of_another_layout_is_refused(tmp_path):
    ckpt = _copy(EP2, tmp_path)
    shutil.copytree(ckpt / "iter_0000010" / "mp_rank_00_001", ckpt / "iter_0000010" / "mp_rank_00_001_000")
    one_line_error(run("inspect", ckpt), "mp_rank_00_001_000 has 2 rank suffix(es), args say PP=1 EP=2")


def test_torch_dist_expert_axis_must_match_num_experts(tmp_path):
    ckpt = _copy(DIST, tmp_path)
    common = ckpt / "iter_0000010" / "common.pt"
    state = _load(common)
    state["args"].num_experts = 8
    save_megatron_file(state, common)
    one_line_error(run("inspect", ckpt), "the expert axis holds 4 experts, args.num_experts is 8",
                   "decoder.layers.mlp.experts.experts.linear_fc")
