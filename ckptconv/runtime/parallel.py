"""Who this rank is and how it talks to the others: TP groups, pipeline neighbours.

Ranks are ordered as in Megatron-Core (tensor-parallel fastest): global rank =
pp_rank * tp + tp_rank. One code path for every backend: gloo on CPU, NCCL on GPU; only the
backend name and the device differ. With a single rank nothing is initialised and every
collective is the identity, so TP=PP=1 runs in-process.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Parallel:
    tp: int
    pp: int
    rank: int
    device: torch.device
    tp_group: object = field(default=None, repr=False)
    owns_group: bool = False

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Parallel":
        return cls(1, 1, 0, torch.device(device))

    @classmethod
    def init(cls, tp: int, pp: int, rank: int, device: torch.device | str, *, init_method: str,
             timeout_s: float) -> "Parallel":
        """Join (create) the default process group of tp*pp ranks and build the TP groups."""
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=tp * pp,
                                timeout=datetime.timedelta(seconds=timeout_s))
        groups = [dist.new_group([p * tp + t for t in range(tp)]) for p in range(pp)] if tp > 1 else [None] * pp
        return cls(tp, pp, rank, device, groups[rank // tp], owns_group=True)

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    def global_rank(self, tp_rank: int, pp_rank: int) -> int:
        return (pp_rank % self.pp) * self.tp + tp_rank

    # -- tensor parallel -------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the partial results of every TP rank (row-parallel layers, vocab embedding)."""
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
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
        """To the same TP rank of the next stage (the last stage wraps to the first: VPP)."""
        dist.send(x.contiguous(), dst=self.global_rank(self.tp_rank, self.pp_rank + 1))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src=self.global_rank(self.tp_rank, self.pp_rank - 1))
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
