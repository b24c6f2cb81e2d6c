"""Experts as an axis of the parallel layout: placement arithmetic, rank-file grid and naming
(pure: no tensors, no files). The grids asserted here are the ones real Megatron-LM / megatron-core
0.16.1 was observed to write (FORMATS.md, "Per-rank directories with EP")."""
from __future__ import annotations

from pathlib import Path

import pytest

from ckptconv.errors import LayoutError
from ckptconv.formats.megatron_names import expert_form, to_canonical, to_impl
from ckptconv.formats.megatron_torch import parse_rank_dir, rank_dir_name
from ckptconv.plan import experts as ex
from ckptconv.plan.megatron_layout import MegatronLayout

X = "decoder.layers.{l}.mlp.experts.local_experts.{e}.linear_fc1.weight"


@pytest.mark.parametrize("E,ep", [(8, 1), (8, 2), (8, 4), (8, 8), (6, 3)])
def test_global_expert_to_rank_and_back(E, ep):
    seen = set()
    for g in range(E):
        r, j = ex.place_expert(g, E, ep)
        assert 0 <= r < ep and 0 <= j < E // ep
        assert r == g // (E // ep)                       # contiguous blocks: [r*E/EP, (r+1)*E/EP)
        assert ex.global_expert(r, j, E, ep) == g
        seen.add((r, j))
    assert len(seen) == E


def test_out_of_range_experts_are_errors():
    with pytest.raises(LayoutError):
        ex.place_expert(4, 4, 2)
    with pytest.raises(LayoutError, match="local expert 2 on EP rank 0"):
        ex.global_expert(0, 2, 4, 2)


@pytest.mark.parametrize("tp,ep,etp,grid", [
    (1, 2, 1, [(0, 0), (0, 1)]),                     # TP1 EP2: mp_rank_00_000, mp_rank_00_001
    (2, 1, 1, [(0, 0), (1, 0)]),                     # dense TP2
    (2, 2, 1, [(0, 0), (1, 1)]),                     # observed: TP and EP ranks move together
    (2, 2, 2, [(0, 0), (0, 1), (1, 0), (1, 1)]),     # observed with ETP 2: all four
    (1, 4, 1, [(0, 0), (0, 1), (0, 2), (0, 3)]),
    (2, 4, 1, [(0, 0), (0, 2), (1, 1), (1, 3)]),
])
def test_rank_grid_follows_megatron_rank_order(tp, ep, etp, grid):
    assert ex.rank_grid(tp, ep, etp) == grid


def test_observed_directory_names_tp2_pp2_ep2():
    lay = MegatronLayout(tp=2, pp=2, num_layers=4, num_experts=4, ep=2)
    names = sorted(rank_dir_name(t, p, lay.pp, e, lay.ep) for t, p, e in lay.rank_files())
    assert names == ["mp_rank_00_000_000", "mp_rank_00_001_000", "mp_rank_01_000_001", "mp_rank_01_001_001"]
    assert rank_dir_name(0, 0, 1, 1, 2) == "mp_rank_00_001"
    assert rank_dir_name(1, 0, 1) == "mp_rank_01"


def test_ep_rank_suffix_is_not_a_pipeline_rank():
    d = Path("mp_rank_00_001")
    assert parse_rank_dir(d, pp=1, ep=2) == (0, 0, 1)    # EP rank 1
    assert parse_rank_dir(d, pp=2, ep=1) == (0, 1, 0)    # PP rank 1
    assert parse_rank_dir(Path("mp_rank_01_001_003"), pp=2, ep=4) == (1, 1, 3)
    with pytest.raises(LayoutError, match="mp_rank_00_001 has 1 rank suffix"):
        parse_rank_dir(d, pp=1, ep=1)
    assert parse_rank_dir(Path("not_a_rank"), pp=1, ep=2) is None


def test_locate_and_global_name_are_inverse_for_experts():
    lay = MegatronLayout(tp=1, pp=2, num_layers=4, num_experts=8, ep=4)
    lay.check()
    for layer in range(4):
        for g in range(8):
            loc = lay.locate(X.format(l=layer, e=g))
            assert (loc.pp_rank, loc.ep_rank) == (layer // 2, g // 2)
            assert loc.local_name == X.format(l=layer % 2, e=g % 2)
            assert lay.global_name(loc.pp_rank, loc.chunk, loc.local_name, loc.ep_rank) == X.format(l=layer, e=g)
    dense = lay.locate("decoder.layers.3.mlp.router.weight")
    assert dense.ep_rank is None and dense.local_name == "decoder.layers.1.mlp.router.weight"


def test_which_files_hold_an_expert_and_which_piece():
    lay = MegatronLayout(tp=2, pp=1, num_layers=2, num_experts=4, ep=2, etp=1)
    assert lay.holders(lay.locate(X.format(l=0, e=3))) == [(1, 0, 1)]    # EP rank 1 lives only in mp_rank_01_001
    assert lay.holders(lay.locate("decoder.layers.0.mlp.router.weight")) == [(0, 0, 0), (1, 0, 1)]
    assert lay.split(X.format(l=0, e=3)) == 1 and lay.split("decoder.layers.0.mlp.linear_fc1.weight") == 2
    etp2 = MegatronLayout(tp=2, pp=1, num_layers=2, num_experts=4, ep=2, etp=2)
    assert etp2.holders(etp2.locate(X.format(l=0, e=3))) == [(0, 0, 1), (1, 0, 1)]
    assert [etp2.piece_rank(X.format(l=0, e=3), t) for t in (0, 1)] == [0, 1]
    assert etp2.local_shape(X.format(l=0, e=3), "gated", (96, 32)) == (48, 32)


@pytest.mark.parametrize("kw,needle", [
    (dict(num_experts=4, ep=3), "num_experts=4 is not divisible by EP=3"),
    (dict(num_experts=4, ep=1, etp=2, tp=1), "ETP=2 does not divide TP=1"),
    (dict(num_experts=None, ep=2), "needs a Mixture-of-Experts model"),
    (dict(num_experts=4, ep=0), "must be positive"),
])
def test_layout_check_refuses_bad_expert_layouts(kw, needle):
    args = {"tp": 1, "pp": 1, "num_layers": 2, **kw}
    with pytest.raises(LayoutError, match=needle):
        MegatronLayout(**args).check()


def test_missing_experts_lists_every_absent_expert_tensor():
    names = {X.format(l=0, e=g) for g in range(4)} | {X.format(l=0, e=g).replace("fc1", "fc2") for g in range(4)}
    names |= {"decoder.layers.1.mlp.router.weight", X.format(l=1, e=0)}
    missing = ex.missing_experts(names, 4)
    assert missing[0] == X.format(l=1, e=0).replace("fc1", "fc2")
    assert len(missing) == 7 and X.format(l=1, e=3) in missing
    assert ex.missing_experts(names - {X.format(l=0, e=2)} | {X.format(l=1, e=g) for g in range(4)}
                              | {X.format(l=1, e=g).replace("fc1", "fc2") for g in range(4)}, 4) == [X.format(l=0, e=2)]


def test_grouped_gemm_names_map_to_the_sequential_form_and_back():
    grouped = "decoder.layers.1.mlp.experts.linear_fc2.weight3"
    assert expert_form(grouped) == "grouped"
    assert to_canonical(grouped) == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    assert to_impl(to_canonical(grouped), "local", grouped_gemm=True) == grouped
    assert expert_form("decoder.layers.0.mlp.experts.weight1") == "legacy_grouped"
    assert to_impl("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "transformer_engine", moe_layer=True) \
        == "decoder.layers.0.pre_mlp_layernorm.weight"
