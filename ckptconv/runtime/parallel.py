"""Who this rank is and how it talks to the others: TP groups, expert groups, pipeline neighbours.

Ranks are ordered as in Megatron-Core (order tp-cp-ep-dp-pp, tensor-parallel fastest). A
pipeline stage has S = lcm(TP, ETP x EP) ranks (just TP for a dense model); global rank =
pp_rank * S + q, and stage rank q has
    TP rank q % TP  (the dense layers' shard; S / TP data-parallel copies of it),
    ETP rank q % ETP and EP rank (q // ETP) % EP  (its experts and its piece of each).
These are exactly the rank files a per-rank Megatron save of that layout writes
(``plan.experts.rank_grid``): each rank runs the file of its own (TP rank, EP rank).
Every rank sees the same tokens; an MoE layer's routed outputs are summed over the expert
group (ETP x EP consecutive stage ranks, which together hold each piece of each expert once).

One code path for every backend: gloo on CPU, NCCL on GPU; only the backend name and the
device differ. With a single rank nothing is initialised and every collective is the
identity, so TP=PP=EP=1 runs in-process.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def stage_size(tp: int, ep: int = 1, etp: int = 1) -> int:
    """Ranks per pipeline stage: lcm(TP, ETP x EP)."""
    return math.lcm(tp, etp * ep)


@dataclass
class Parallel:
    tp: int
    pp: int
    rank: int
    device: torch.device
    ep: int = 1
    etp: int = 1
    tp_group: object = field(default=None, repr=False)
    expert_group: object = field(default=None, repr=False)
    owns_group: bool = False

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Parallel":
        return cls(1, 1, 0, torch.device(device))

    @classmethod
    def init(cls, tp: int, pp: int, rank: int, device: torch.device | str, *, init_method: str,
             timeout_s: float, ep: int = 1, etp: int = 1) -> "Parallel":
        """Join (create) the default process group of PP x lcm(TP, ETP x EP) ranks and build the
        TP and expert groups (every rank creates every group, in the same order)."""
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        s = stage_size(tp, ep, etp)
        dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=pp * s,
                                timeout=datetime.timedelta(seconds=timeout_s))
        par = cls(tp, pp, rank, device, ep, etp, owns_group=True)
        par.tp_group = _blocks(pp, s, tp, rank)
        par.expert_group = _blocks(pp, s, etp * ep, rank)
        return par

    @property
    def stage(self) -> int:
        return stage_size(self.tp, self.ep, self.etp)

    @property
    def world(self) -> int:
        return self.pp * self.stage

    @property
    def stage_rank(self) -> int:
        return self.rank % self.stage

    @property
    def tp_rank(self) -> int:
        return self.stage_rank % self.tp

    @property
    def ep_rank(self) -> int:
        return (self.stage_rank // self.etp) % self.ep

    @property
    def etp_rank(self) -> int:
        return self.stage_rank % self.etp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.stage

    def global_rank(self, stage_rank: int, pp_rank: int) -> int:
        return (pp_rank % self.pp) * self.stage + stage_rank

    # -- tensor parallel -------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the partial results of every TP rank (row-parallel layers, vocab embedding)."""
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def expert_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the expert group: every EP rank's experts, every ETP piece of each."""
        if self.etp * self.ep > 1:
            dist.all_reduce(x, group=self.expert_group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every TP rank's slice of the last dim (vocab-parallel logits)."""
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # -- pipeline --------------------------------------------------------------------
    def send_next(self, x: torch.Tensor) -> None:
        """To the same stage rank of the next stage (the last stage wraps to the first: VPP)."""
        dist.send(x.contiguous(), dst=self.global_rank(self.stage_rank, self.pp_rank + 1))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src=self.global_rank(self.stage_rank, self.pp_rank - 1))
        return buf

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x.contiguous(), dst=dst)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src=src)
        return buf

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def _blocks(pp: int, stage: int, size: int, rank: int):
    """Create the groups of ``size`` consecutive stage ranks of every stage; return ``rank``'s
    (None when ``size`` is 1: its collectives are the identity)."""
    if size == 1:
        return None
    mine = None
    for p in range(pp):
        for b in range(stage // size):
            ranks = [p * stage + b * size + i for i in range(size)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
    return mine
