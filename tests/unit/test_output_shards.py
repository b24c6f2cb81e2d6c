"""Unit tests for ckptconv.plan.output_shards (pure planning, plain ints)."""
from __future__ import annotations

import random

import pytest

from ckptconv.plan.output_shards import parse_size, plan_shards, shard_file_names


@pytest.mark.parametrize("s, n", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("100KB", 100_000),
    ("123", 123), (123, 123), ("1.5GB", 1_500_000_000), ("10 mib", 10 * 2**20),
    (" 7B ", 7), ("1TB", 10**12), ("0", 0),
])
def test_parse_size_ok(s, n):
    assert parse_size(s) == n


@pytest.mark.parametrize("s", ["", "GB", "5XB", "five", "-1", "5 G B", "1e9", -5, True, None, 2.5])
def test_parse_size_rejects(s):
    with pytest.raises(ValueError, match="size"):
        parse_size(s)


def test_plan_exact_boundary_and_split():
    sizes = [("a", 4), ("b", 4), ("c", 2), ("d", 1)]
    assert plan_shards(sizes, 10) == [["a", "b", "c"], ["d"]]   # 10 fits exactly, 11 does not
    assert plan_shards(sizes, 9) == [["a", "b"], ["c", "d"]]
    assert plan_shards(sizes, 100) == [["a", "b", "c", "d"]]
    assert plan_shards(sizes, 4) == [["a"], ["b"], ["c", "d"]]


def test_plan_oversize_tensor_gets_own_shard_in_order():
    sizes = [("a", 3), ("big", 25), ("c", 3), ("d", 3), ("huge", 11), ("e", 1)]
    assert plan_shards(sizes, 10) == [["a"], ["big"], ["c", "d"], ["huge"], ["e"]]
    assert plan_shards([("big", 25)], 10) == [["big"]]


def test_plan_empty_and_zero_sized():
    assert plan_shards([], 10) == []
    assert plan_shards([("z", 0), ("a", 10), ("y", 0)], 10) == [["z", "a", "y"]]


def test_plan_random_invariants():
    rng = random.Random(0)
    for trial in range(200):
        names = [f"t{i}" for i in range(rng.randint(1, 40))]
        sizes = [(n, rng.choice([0, 1, 7, 50, 99, 100, 101, 250])) for n in names]
        limit = rng.choice([1, 50, 100, 333])
        shards = plan_shards(sizes, limit)
        flat = [n for s in shards for n in s]
        assert flat == names                      # order preserved, every name exactly once
        size_of = dict(sizes)
        for s in shards:
            assert s, "no empty shards"
            total = sum(size_of[n] for n in s)
            assert total <= limit or len(s) == 1  # only a lone oversize tensor may exceed
        for a, b in zip(shards, shards[1:]):      # greedy: next tensor really did not fit
            assert sum(size_of[n] for n in a) + size_of[b[0]] > limit


def test_plan_matches_huggingface_hub_when_nothing_is_oversize():
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    rng = random.Random(1)
    for _ in range(50):
        sd = {f"w{i}": rng.randint(1, 100) for i in range(rng.randint(1, 30))}
        limit = 100
        ref = split_state_dict_into_shards_factory(
            sd, max_shard_size=limit, get_storage_size=lambda x: x, get_storage_id=lambda x: None,
            filename_pattern="model{suffix}.safetensors")
        ours = plan_shards(list(sd.items()), limit)
        assert list(ref.filename_to_tensors.values()) == ours
        assert list(ref.filename_to_tensors) == shard_file_names(len(ours))


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="twice"):
        plan_shards([("a", 1), ("a", 2)], 10)
    with pytest.raises(ValueError, match="negative"):
        plan_shards([("a", -1)], 10)
    with pytest.raises(ValueError, match="max_shard_size"):
        plan_shards([("a", 1)], 0)


def test_shard_file_names():
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == ["model-00001-of-00003.safetensors",
                                   "model-00002-of-00003.safetensors",
                                   "model-00003-of-00003.safetensors"]
    assert len(set(shard_file_names(120))) == 120
    assert shard_file_names(120)[-1] == "model-00120-of-00120.safetensors"
    with pytest.raises(ValueError):
        shard_file_names(0)
