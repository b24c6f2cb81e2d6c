"""Megatron-Core parallel layout: chunk arithmetic only (metadata, no tensors, no I/O).

* Which Megatron module is split how over TP ranks (a property of Megatron, not of a family).
* Which pipeline stage / virtual chunk holds which global layer, and its local index.
* Vocab padding as Megatron-LM computes it.
* Experts (EP, ETP) as one more axis: see ``plan.experts`` for the arithmetic.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from ..errors import LayoutError
from . import experts as ex

# How each Megatron logical tensor is split over TP ranks. First match wins.
#   column: dim 0 contiguous chunks      row: dim 1 contiguous chunks
#   vocab:  dim 0 chunks of the padded vocab   gated: rank r holds cat(gate_r, up_r)
#   replicated: every TP rank holds the whole tensor
TP_PLACEMENT: tuple[tuple[str, str], ...] = (
    (r"\.layer_norm_(weight|bias)$", "replicated"),
    (r"layernorm\.(weight|bias)$", "replicated"),
    (r"linear_qkv\.(weight|bias)$", "column"),
    (r"linear_proj\.weight$", "row"),
    (r"linear_proj\.bias$", "replicated"),
    (r"linear_fc1\.(weight|bias)$", "gated"),
    (r"linear_fc2\.weight$", "row"),
    (r"linear_fc2\.bias$", "replicated"),
    (r"^embedding\.word_embeddings\.weight$", "vocab"),
    (r"^embedding\.position_embeddings\.weight$", "replicated"),
    (r"^output_layer\.weight$", "vocab"),
    (r"\.mlp\.router\.(weight|expert_bias)$", "replicated"),
    (r"\.shared_experts\.gate_weight$", "replicated"),
)

LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


_PLACEMENT_RES = tuple((re.compile(p), kind) for p, kind in TP_PLACEMENT)


@lru_cache(maxsize=4096)
def tp_kind(name: str, gated_mlp: bool = True) -> str:
    for pattern, kind in _PLACEMENT_RES:
        if pattern.search(name):
            return "column" if kind == "gated" and not gated_mlp else kind
    raise LayoutError(f"no tensor-parallel placement known for {name!r}", tensor=name,
                      fix="this Megatron module is not supported yet")


def split_dim(kind: str) -> int | None:
    return {"column": 0, "vocab": 0, "gated": 0, "row": 1}.get(kind)


def tp_pieces(kind: str, shape: tuple[int, ...], tp: int, rank: int,
              name: str = "?") -> list[tuple[int, int, int]]:
    """The (dim, start, stop) ranges of the logical tensor that TP rank ``rank`` holds, in the
    order they are concatenated (along dim 0, or along ``dim`` for a single piece)."""
    if kind == "replicated" or tp == 1:
        return [(0, 0, shape[0])] if shape else []
    dim = split_dim(kind)
    if kind == "gated":
        half = shape[0] // 2
        if shape[0] % 2 or half % tp:
            raise LayoutError(f"gated MLP rows {shape[0]} cannot be split in gate/up halves over TP={tp}",
                              tensor=name, fix="choose a TP that divides the FFN size")
        n = half // tp
        return [(0, rank * n, (rank + 1) * n), (0, half + rank * n, half + (rank + 1) * n)]
    if dim >= len(shape) or shape[dim] % tp:
        raise LayoutError(f"dim {dim} of shape {tuple(shape)} is not divisible by TP={tp}",
                          tensor=name, fix="choose a TP that divides it")
    n = shape[dim] // tp
    return [(dim, rank * n, (rank + 1) * n)]


def local_shape(kind: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = split_dim(kind)
    if kind == "replicated" or tp == 1 or dim is None:
        return tuple(shape)
    out = list(shape)
    out[dim] //= tp
    return tuple(out)


def pad_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's _vocab_size_with_padding: round up to a multiple of divisible_by * tp."""
    m = divisible_by * tp
    return ((vocab + m - 1) // m) * m


@dataclass(frozen=True)
class Location:
    pp_rank: int
    chunk: int          # virtual pipeline chunk (model0, model1, ...)
    local_name: str     # local layer number and, for an expert, local expert index
    ep_rank: int | None = None   # the EP rank holding this expert; None: every EP rank holds it


@dataclass(frozen=True)
class MegatronLayout:
    tp: int
    pp: int
    num_layers: int
    vpp: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    num_experts: int | None = None     # None: a dense model
    ep: int = 1                        # expert model parallel
    etp: int = 1                       # expert tensor parallel (Megatron-LM's default 1)

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def split(self, name: str) -> int:
        """Over how many ranks the tensor's TP placement splits it: ETP for an expert, else TP."""
        return self.etp if ex.expert_index(name) is not None else self.tp

    def piece_rank(self, name: str, tp_rank: int) -> int:
        """Which TP piece of ``name`` the file of dense TP rank ``tp_rank`` holds."""
        return ex.etp_rank_of(tp_rank, self.etp) if ex.expert_index(name) is not None else tp_rank

    def rank_files(self) -> list[tuple[int, int, int]]:
        """(tp_rank, pp_rank, ep_rank) of every file of the per-rank format."""
        return [(t, p, e) for p in range(self.pp) for t, e in ex.rank_grid(self.tp, self.ep, self.etp)]

    def holders(self, loc: "Location") -> list[tuple[int, int, int]]:
        """The per-rank files (tp_rank, pp_rank, ep_rank) that hold (a TP piece of) a tensor at ``loc``."""
        return [(t, p, e) for t, p, e in self.rank_files()
                if p == loc.pp_rank and (loc.ep_rank is None or loc.ep_rank == e)]

    def local_shape(self, name: str, kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one rank's piece of the logical tensor ``name``."""
        return local_shape(kind, shape, self.split(name))

    def pieces(self, name: str, kind: str, shape: tuple[int, ...], tp_rank: int) -> list[tuple[int, int, int]]:
        """``tp_pieces`` of ``name`` for the file of dense TP rank ``tp_rank``."""
        return tp_pieces(kind, shape, self.split(name), self.piece_rank(name, tp_rank), name)

    def check(self) -> None:
        if self.tp < 1 or self.pp < 1 or (self.vpp is not None and self.vpp < 1):
            raise LayoutError(f"TP={self.tp} PP={self.pp} VPP={self.vpp} must be positive",
                              fix="pass --tp/--pp/--vpp >= 1")
        if self.vpp is not None and self.pp == 1 and self.vpp > 1:
            raise LayoutError("virtual pipeline needs PP > 1", fix="drop --vpp or raise --pp")
        if (self.first_stage_layers or self.last_stage_layers) and self.chunks > 1:
            raise LayoutError("uneven first/last pipeline stages with virtual pipeline are not supported",
                              fix="use an even split with --vpp")
        counts = self.stage_layer_counts()
        if sum(counts) != self.num_layers or min(counts) < 0:
            raise LayoutError(f"{self.num_layers} layers cannot be split as {counts}",
                              fix="choose PP (x VPP) that divides the number of layers")
        ex.check_experts(self.num_experts, self.ep, self.etp, self.tp)

    def stage_layer_counts(self) -> list[int]:
        """Layers per (chunk, stage) in global order: index v * pp + p."""
        n = self.pp * self.chunks
        if not (self.first_stage_layers or self.last_stage_layers):
            if self.num_layers % n:
                raise LayoutError(f"{self.num_layers} layers are not divisible by PP x VPP = {n}",
                                  fix="choose PP and VPP whose product divides the number of layers")
            return [self.num_layers // n] * n
        first = self.first_stage_layers
        last = self.last_stage_layers if self.pp > 1 else None
        middle = self.pp - (first is not None) - (last is not None)
        rest = self.num_layers - (first or 0) - (last or 0)
        if middle and rest % middle:
            raise LayoutError(f"{rest} layers cannot be split evenly over the {middle} middle stages",
                              fix="adjust the first/last stage layer counts")
        each = rest // middle if middle else 0
        counts = [each] * self.pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts

    def layer_locations(self) -> list[tuple[int, int, int]]:
        """(pp_rank, chunk, local index) for every global layer."""
        counts = self.stage_layer_counts()
        out = []
        for v in range(self.chunks):
            for p in range(self.pp):
                out += [(p, v, j) for j in range(counts[v * self.pp + p])]
        return out

    @cached_property
    def _locations(self) -> list[tuple[int, int, int]]:
        return self.layer_locations()

    def locate(self, name: str) -> Location:
        """Where the logical tensor ``name`` (global layer numbers, global expert index) lives."""
        m = LAYER_RE.match(name)
        if m:
            g = int(m.group(1))
            if g >= len(self._locations):
                raise LayoutError(f"layer {g} beyond num_layers={self.num_layers}", tensor=name)
            p, v, j = self._locations[g]
            local, ep_rank = f"decoder.layers.{j}.{m.group(2)}", None
            e = ex.expert_index(name)
            if e is not None:
                ep_rank, k = ex.place_expert(e, self._experts(name), self.ep)
                local = ex.with_expert(local, k)
            return Location(p, v, local, ep_rank)
        if name.startswith("embedding."):
            return Location(0, 0, name)
        return Location(self.pp - 1, self.chunks - 1, name)

    def global_name(self, pp_rank: int, chunk: int, local_name: str, ep_rank: int = 0) -> str:
        """The logical name of ``local_name`` (local layer, local expert) in a file of EP rank ``ep_rank``."""
        m = LAYER_RE.match(local_name)
        if not m:
            return local_name
        counts = self.stage_layer_counts()
        idx = chunk * self.pp + pp_rank
        j = int(m.group(1))
        if j >= counts[idx]:
            raise LayoutError(f"local layer {j} on stage {pp_rank} chunk {chunk} exceeds its {counts[idx]} layers",
                              tensor=local_name, fix="check the checkpoint's PP/VPP settings in args")
        name = f"decoder.layers.{sum(counts[:idx]) + j}.{m.group(2)}"
        k = ex.expert_index(name)
        if k is not None:
            name = ex.with_expert(name, ex.global_expert(ep_rank, k, self._experts(name), self.ep))
        return name

    def _experts(self, name: str) -> int:
        if self.num_experts is None:
            raise LayoutError("an expert tensor in a model without num_experts", tensor=name,
                              fix="set num_experts in args (or the HF config) for a Mixture-of-Experts model")
        return self.num_experts
