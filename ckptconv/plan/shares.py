"""How a conversion's output is split between workers (pure: names, shapes and layouts only).

A share is a set of output units one worker writes: per-rank Megatron files ``(tp, pp, ep)``,
logical tensors of one DCP/torch_dist checkpoint, or Hugging Face safetensors shard files.
Shares are balanced by bytes and depend only on the plan, so every process (local workers,
torchrun ranks on several machines) computes the same partition without talking to the others.
"""
from __future__ import annotations

import math

from .megatron_layout import MegatronLayout, tp_kind


def partition(sizes: dict, workers: int) -> list[list]:
    """Keys of ``sizes`` (key -> bytes) split into ``workers`` lists with balanced byte totals:
    largest first onto the least loaded worker (ties: lower key order, lower worker)."""
    index = {k: i for i, k in enumerate(sizes)}
    order = sorted(sizes, key=lambda k: (-sizes[k], index[k]))
    loads, out = [0] * workers, [[] for _ in range(workers)]
    for k in order:
        w = min(range(workers), key=lambda i: (loads[i], i))
        out[w].append(k)
        loads[w] += sizes[k]
    return [sorted(ks, key=index.__getitem__) for ks in out]


def megatron_file_sizes(layout: MegatronLayout, metas, gated: bool, tied: bool) -> dict[tuple[int, int, int], int]:
    """Bytes of every per-rank output file ``(tp_rank, pp_rank, ep_rank)`` (``metas``: logical
    Megatron tensors; ``tied``: the first stage's embedding is also the last stage's output layer)."""
    sizes = {k: 0 for k in layout.rank_files()}
    for m in metas:
        n = m.dtype.itemsize * math.prod(layout.local_shape(m.name, tp_kind(m.name, gated), m.shape))
        locs = [layout.locate(m.name)]
        if tied and m.name == "embedding.word_embeddings.weight" and layout.pp > 1:
            locs.append(layout.locate("output_layer.weight"))
        for loc in locs:
            for k in layout.holders(loc):
                sizes[k] += n
    return sizes


def megatron_file_shares(layout: MegatronLayout, metas, gated: bool, tied: bool,
                         workers: int) -> list[set[tuple[int, int, int]]]:
    """Per-rank files per worker. Whole pipeline stages stay together while there are at least as
    many stages as workers (a worker then reads only the logical tensors of its stages, each
    once); otherwise single files are shared out."""
    sizes = megatron_file_sizes(layout, metas, gated, tied)
    if workers <= layout.pp:
        stages = {p: sum(v for k, v in sizes.items() if k[1] == p) for p in range(layout.pp)}
        return [{k for k in sizes if k[1] in ps} for ps in partition(stages, workers)]
    return [set(ks) for ks in partition(sizes, workers)]


def tensor_shares(metas, workers: int) -> list[set[str]]:
    """Logical tensors per worker (one DCP checkpoint written collectively)."""
    return [set(ns) for ns in partition({m.name: m.nbytes for m in metas}, workers)]


def file_shares(files: dict[str, int], workers: int) -> list[set[str]]:
    """Output files (name -> bytes, e.g. safetensors shards) per worker."""
    return [set(fs) for fs in partition(files, workers)]

