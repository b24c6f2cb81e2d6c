"""ZeRO flat-partition arithmetic, with plain ints: the layouts below were read off real
DeepSpeed 0.19.8 checkpoints (../shared/recipes/deepspeed/results/layouts.txt)."""
from __future__ import annotations

import random

import pytest

from ckptconv.errors import LayoutError
from ckptconv.plan.zero_partitions import (Piece, fragment_pieces, zero2_align, zero3_partition, zero3_pieces,
                                           zero12_pieces)

# the "odd" Llama (hidden 63, 3 heads of 22, 1 kv head, ffn 127, vocab 257), param_shapes order
LAYER = [("q", 4158), ("k", 1386), ("v", 1386), ("o", 4158), ("gate", 8001), ("up", 8001), ("down", 8001),
         ("ln1", 63), ("ln2", 63)]
ODD = [("embed", 16191)] + [(f"{i}.{n}", s) for i in range(2) for n, s in LAYER] + [("norm", 63), ("head", 16191)]


def test_stage2_odd_model_param_spans_two_ranks():
    assert sum(s for _, s in ODD) == 102879
    pieces = zero12_pieces([ODD], [[51440], [51439]])            # rank 1 saved without its 1 padding element
    assert pieces["1.q"] == [Piece(0, 0, 51408, 51440), Piece(1, 0, 0, 4126)]
    assert pieces["1.k"] == [Piece(1, 0, 4126, 5512)]
    assert pieces["head"] == [Piece(1, 0, 35248, 51439)]
    assert all(sum(p.numel for p in ps) == dict(ODD)[n] for n, ps in pieces.items())


def test_stage2_two_groups_second_group_spans_ranks():
    decay = [p for p in ODD if not p[0].endswith(("ln1", "ln2", "norm"))]
    no_decay = [p for p in ODD if p[0].endswith(("ln1", "ln2", "norm"))]
    pieces = zero12_pieces([decay, no_decay], [[51282, 158], [51282, 157]])
    assert pieces["1.q"] == [Piece(1, 0, 0, 4158)]
    assert pieces["1.ln1"] == [Piece(0, 1, 126, 158), Piece(1, 1, 0, 31)]
    assert pieces["norm"] == [Piece(1, 1, 94, 157)]


def test_bf16_optimizer_keeps_padding_in_every_partition():
    tiny = [("embed", 16384)] + [(f"{i}.{n}", s) for i in range(2) for n, s in
                                 [("q", 4096), ("k", 2048), ("v", 2048), ("o", 4096), ("gate", 8192), ("up", 8192),
                                  ("down", 8192), ("ln1", 64), ("ln2", 64)]] + [("norm", 64), ("head", 16384)]
    pieces = zero12_pieces([tiny], [[53408], [53408]])
    assert pieces["1.q"] == [Piece(0, 0, 53376, 53408), Piece(1, 0, 0, 4064)]
    assert pieces["head"] == [Piece(1, 0, 37024, 53408)]


def test_alignment_paddings_between_params():
    pieces = zero12_pieces([[("a", 5), ("b", 3)]], [[6], [6]], alignment_paddings=[[2, 0]])
    assert pieces["a"] == [Piece(0, 0, 0, 5)] and pieces["b"] == [Piece(1, 0, 1, 4)]


def test_stage3_odd_model_pads_each_param():
    assert zero3_partition(16191, 2) == (8096, 1) and zero3_partition(4158, 2) == (2079, 0)
    pieces = zero3_pieces(ODD, [51446], 2)
    assert pieces["embed"] == [Piece(0, 0, 0, 8096), Piece(1, 0, 0, 8095)]
    assert pieces["0.q"] == [Piece(0, 0, 8096, 10175), Piece(1, 0, 8096, 10175)]
    assert pieces["head"] == [Piece(0, 0, 43350, 51446), Piece(1, 0, 43350, 51445)]


def test_stage3_sub_groups():
    decay = [p for p in ODD if not p[0].endswith(("ln1", "ln2", "norm"))]
    no_decay = [p for p in ODD if p[0].endswith(("ln1", "ln2", "norm"))]
    # DeepSpeed split the decay group into sub-groups of <= 20000 elements: [21642, 21548, 8096] + [160]
    pieces = zero3_pieces(decay + no_decay, [21642, 21548, 8096, 160], 2)
    assert pieces["0.down"] == [Piece(0, 1, 0, 4001), Piece(1, 1, 0, 4000)]
    assert pieces["head"] == [Piece(0, 2, 0, 8096), Piece(1, 2, 0, 8095)]
    assert pieces["norm"] == [Piece(0, 3, 128, 160), Piece(1, 3, 128, 159)]


def test_mismatched_sizes_are_layout_errors():
    with pytest.raises(LayoutError, match="need 102879 elements"):
        zero12_pieces([ODD], [[51440], [41439]])
    with pytest.raises(LayoutError, match="per rank"):
        zero3_pieces(ODD, [51440], 2)
    with pytest.raises(LayoutError, match="flat groups"):
        zero12_pieces([ODD, ODD], [[51440], [51439]])


def test_fragment_pieces():
    assert fragment_pieces(7, 2) == [Piece(0, 0, 0, 4), Piece(1, 0, 0, 3)]
    assert fragment_pieces(1, 4) == [Piece(0, 0, 0, 1)]


def _simulate_zero12(groups, world, rng):
    """Lay element ids out like DeepSpeed stage 1/2 and drop some end padding of the last rank."""
    ranks = [[] for _ in range(world)]
    for g in groups:
        flat = [f"{n}:{i}" for n, s in g for i in range(s)]
        flat += ["pad"] * (zero2_align(len(flat), world) - len(flat))
        per = len(flat) // world
        for r in range(world):
            ranks[r].append(flat[r * per:(r + 1) * per])
        while ranks[-1][-1] and ranks[-1][-1][-1] == "pad" and rng.random() < 0.5:
            ranks[-1][-1].pop()
    return ranks


def _simulate_zero3(params, world, group_cut):
    ranks = [[[]] for _ in range(world)]
    for k, (n, s) in enumerate(params):
        if k in group_cut:
            for r in range(world):
                ranks[r].append([])
        per, _ = zero3_partition(s, world)
        ids = [f"{n}:{i}" for i in range(s)] + ["pad"] * (per * world - s)
        for r in range(world):
            ranks[r][-1] += ids[r * per:(r + 1) * per]
    return ranks


@pytest.mark.parametrize("seed", range(20))
def test_pieces_rebuild_every_param_exactly(seed):
    rng = random.Random(seed)
    world = rng.choice([1, 2, 3, 4, 8])
    groups = [[(f"g{g}p{i}", rng.randint(1, 50)) for i in range(rng.randint(1, 6))] for g in range(rng.randint(1, 3))]
    ranks = _simulate_zero12(groups, world, rng)
    pieces = zero12_pieces(groups, [[len(x) for x in r] for r in ranks])
    params = [p for g in groups for p in g]
    for name, size in params:
        got = [x for p in pieces[name] for x in ranks[p.rank][p.group][p.start:p.stop]]
        assert got == [f"{name}:{i}" for i in range(size)]
    cut = set(rng.sample(range(1, len(params)), k=min(2, len(params) - 1))) if len(params) > 1 else set()
    ranks3 = _simulate_zero3(params, world, cut)
    pieces3 = zero3_pieces(params, [len(x) for x in ranks3[0]], world)
    for name, size in params:
        got = [x for p in pieces3[name] for x in ranks3[p.rank][p.group][p.start:p.stop]]
        assert got == [f"{name}:{i}" for i in range(size)]
