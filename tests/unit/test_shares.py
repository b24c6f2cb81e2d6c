"""Worker shares (plan/shares.py) and the worker count (engine/workers.resolve_workers): plain ints,
no tensors, no processes."""
from __future__ import annotations

import pytest
import torch

from ckptconv.engine.workers import AUTO_MIN_BYTES, WORKER_OVERHEAD, resolve_workers
from ckptconv.errors import LayoutError
from ckptconv.plan.megatron_layout import MegatronLayout
from ckptconv.plan.shares import file_shares, megatron_file_shares, partition, tensor_shares
from ckptconv.types import TensorMeta

GiB = 2**30


def test_partition_balances_bytes():
    assert partition({"a": 5, "b": 4, "c": 3, "d": 3}, 2) == [["a", "d"], ["b", "c"]]
    assert partition({"a": 1}, 3) == [["a"], [], []]
    assert sorted(sum(partition({i: i % 7 for i in range(50)}, 4), [])) == list(range(50))


def _metas(layers=4):
    out = [TensorMeta("embedding.word_embeddings.weight", (256, 64), torch.float32)]
    for i in range(layers):
        out += [TensorMeta(f"decoder.layers.{i}.self_attention.linear_qkv.weight", (192, 64), torch.float32),
                TensorMeta(f"decoder.layers.{i}.mlp.linear_fc2.weight", (64, 128), torch.float32)]
    return out + [TensorMeta("output_layer.weight", (256, 64), torch.float32)]


def test_megatron_file_shares_keep_stages_together_then_split_files():
    lay = MegatronLayout(2, 2, 4)
    two = megatron_file_shares(lay, _metas(), True, False, 2)
    assert sorted({p for _, p, _ in s} for s in two) == [{0}, {1}]     # one stage each
    four = megatron_file_shares(lay, _metas(), True, False, 4)
    assert sorted(len(s) for s in four) == [1, 1, 1, 1] and set().union(*four) == set(lay.rank_files())


def test_tensor_and_file_shares_cover_everything_once():
    metas = _metas()
    parts = tensor_shares(metas, 3)
    assert sum(map(len, parts)) == len(metas) and set().union(*parts) == {m.name for m in metas}
    assert file_shares({"a": 10, "b": 9, "c": 2}, 2) == [{"a"}, {"b", "c"}]


@pytest.mark.parametrize("kw,expected", [
    (dict(requested=4, units=2), 2),                                  # capped at the output units
    (dict(requested=1, units=8), 1),
    (dict(requested="auto", units=8, total_bytes=AUTO_MIN_BYTES - 1), 1),   # small: one process
    (dict(requested="auto", units=8, cpus=2), 1),                     # two CPUs per worker
    (dict(requested="auto", units=8, cpus=4), 2),
    (dict(requested="auto", units=8, cpus=5), 2),
    (dict(requested="auto", units=3, cpus=16), 3),                    # the output units
    (dict(requested="auto", units=8, cpus=16, worker_bytes=3 * GiB, memory=7 * GiB), 2),   # memory
    (dict(requested="auto", units=8, cpus=16, worker_bytes=3 * GiB, memory=1 * GiB), 1),
])
def test_resolve_workers(kw, expected):
    base = dict(total_bytes=10 * GiB, worker_bytes=GiB - WORKER_OVERHEAD, cpus=8, memory=64 * GiB)
    assert resolve_workers(**{**base, **kw}) == expected


@pytest.mark.parametrize("bad", [0, -1, "many"])
def test_resolve_workers_refuses(bad):
    with pytest.raises(LayoutError, match="--workers"):
        resolve_workers(bad, units=1, total_bytes=0, worker_bytes=0)
