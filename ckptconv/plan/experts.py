"""Experts as an axis of the Megatron parallel layout: names and placement arithmetic only.

A Megatron *logical* expert tensor carries its GLOBAL expert index in the SequentialMLP name
(the name a TP=1, EP=1 model has):

    decoder.layers.{layer}.mlp.experts.local_experts.{g}.linear_fc1.weight

Expert parallelism (EP) places experts [r*E/EP, (r+1)*E/EP) on EP rank r, where they carry the
local index g - r*E/EP. Expert tensor parallelism (ETP) splits each expert's fc1/fc2 the way TP
splits the dense MLP. Which files of the per-rank format exist, and which EP / ETP rank each
holds, follows Megatron-Core's rank order (tp-cp-ep-dp-pp): within a pipeline stage, global rank
q has TP rank q % TP, ETP rank q % ETP and EP rank (q // ETP) % EP; the files are those of the
smallest world, lcm(TP, ETP*EP) ranks per stage, so that every rank finds its file (as observed
from Megatron-LM: TP2 EP2 on 2 ranks writes only mp_rank_00_000 and mp_rank_01_001). No tensors,
no I/O.
"""
from __future__ import annotations

import math
import re

from ..errors import LayoutError

EXPERT_RE = re.compile(r"^(?P<head>decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(?P<e>\d+)(?P<tail>\..+)$")


def expert_index(name: str) -> int | None:
    """The expert index in a (logical or local) expert tensor name; None for other tensors."""
    m = EXPERT_RE.match(name)
    return int(m.group("e")) if m else None


def with_expert(name: str, e: int) -> str:
    """``name`` with its expert index replaced by ``e``."""
    m = EXPERT_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not an expert tensor")
    return f"{m.group('head')}{e}{m.group('tail')}"


def expert_stem(name: str) -> str | None:
    """``name`` with the expert index blanked (``...local_experts.*.linear_fc1.weight``)."""
    m = EXPERT_RE.match(name)
    return f"{m.group('head')}*{m.group('tail')}" if m else None


def check_experts(num_experts: int | None, ep: int, etp: int, tp: int) -> None:
    if ep < 1 or etp < 1:
        raise LayoutError(f"EP={ep} ETP={etp} must be positive", fix="pass --ep/--etp >= 1")
    if num_experts is None:
        if ep > 1 or etp > 1:
            raise LayoutError(f"EP={ep} ETP={etp} needs a Mixture-of-Experts model (num_experts is not set)",
                              fix="drop --ep/--etp for a dense model")
        return
    if num_experts % ep:
        raise LayoutError(f"num_experts={num_experts} is not divisible by EP={ep}",
                          fix=f"choose an EP that divides {num_experts}")
    if tp % etp:
        raise LayoutError(f"ETP={etp} does not divide TP={tp} (each file's expert tensor-parallel rank is "
                          f"its TP rank modulo ETP)", fix="choose an ETP that divides TP (Megatron's default is 1)")


def experts_per_rank(num_experts: int, ep: int) -> int:
    return num_experts // ep


def place_expert(g: int, num_experts: int, ep: int) -> tuple[int, int]:
    """Global expert ``g`` -> (EP rank, local index)."""
    if not 0 <= g < num_experts:
        raise LayoutError(f"expert {g} is outside 0..{num_experts - 1}", fix="check num_experts in args/config")
    n = experts_per_rank(num_experts, ep)
    return g // n, g % n


def global_expert(ep_rank: int, local: int, num_experts: int, ep: int) -> int:
    """(EP rank, local index) -> global expert."""
    n = experts_per_rank(num_experts, ep)
    if not (0 <= ep_rank < ep and 0 <= local < n):
        raise LayoutError(f"local expert {local} on EP rank {ep_rank} does not fit {num_experts} experts over "
                          f"EP={ep} ({n} per rank)", fix="check num_experts / expert_model_parallel_size in args")
    return ep_rank * n + local


def rank_grid(tp: int, ep: int, etp: int) -> list[tuple[int, int]]:
    """The (TP rank, EP rank) pairs of one pipeline stage that a per-rank save writes, sorted."""
    out: list[tuple[int, int]] = []
    for q in range(math.lcm(tp, etp * ep)):
        pair = (q % tp, (q // etp) % ep)
        if pair not in out:
            out.append(pair)
    return sorted(out)


def etp_rank_of(tp_rank: int, etp: int) -> int:
    """The expert tensor-parallel rank of the file whose dense TP rank is ``tp_rank``."""
    return tp_rank % etp


def missing_experts(names, num_experts: int) -> list[str]:
    """The expert tensors a complete model has and ``names`` (logical names) lacks: every layer
    that has a router or an expert has all ``num_experts`` experts, each with every parameter
    that any expert of the model has."""
    names = set(names)
    tails, layers = set(), set()
    for n in names:
        m = EXPERT_RE.match(n)
        if m:
            tails.add(m.group("tail"))
            layers.add(m.group("head"))
        elif n.endswith(".mlp.router.weight"):
            layers.add(n[: -len("router.weight")] + "experts.local_experts.")
    want = (f"{h}{g}{t}" for h in layers for g in range(num_experts) for t in sorted(tails or {".linear_fc1.weight"}))
    return sorted((n for n in want if n not in names), key=_natural)


def _natural(name: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]
