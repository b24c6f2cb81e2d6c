"""A Mixture-of-Experts layer as transformers computes it (Mixtral, Qwen2-MoE, Qwen3-MoE), on
expert-parallel ranks; every rule comes from the ModelConfig (families.config):

    logits  = x @ router^T                        (every rank: the router is replicated)
    probs   = softmax(logits in fp32) ; top-k     (k = moe_topk; ties broken as torch.topk)
    weights = top-k probs, / their sum when moe_norm_topk (Mixtral always; Qwen: norm_topk_prob)
    y       = sum over the chosen experts e of weights_e * fc2_e(act(gate_e x) * up_e x)
            + [sigmoid(x @ shared_gate^T) *] shared_expert(x)     (Qwen2-MoE)

Dropless: every token reaches its k experts (no capacity, no token dropping). Each rank holds
the experts of its EP rank (global [r E/EP, (r+1) E/EP)), each expert's fc1 rows / fc2 columns
split over ETP like the dense MLP over TP; it computes them for the tokens routed to them and
the partial outputs are summed over the expert group (``Parallel.expert_all_reduce``). The
shared expert is TP-split like the dense MLP. At EP = ETP = TP = 1 the arithmetic is
transformers' own, expert by expert in the same order.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..families.schema import ModelConfig
from ..plan.experts import experts_per_rank
from .layers import ACTIVATIONS, activate
from .parallel import Parallel

GetWeight = Callable[[str], torch.Tensor]

ROUTER = "mlp.router.weight"
EXPERT = "mlp.experts.local_experts.{e}."
SHARED = "mlp.shared_experts."


def route(x: torch.Tensor, router: torch.Tensor, topk: int, renormalise: bool):
    """(weights [T, k] fp32, expert ids [T, k]) for the tokens x [T, H]."""
    probs = F.linear(x, router).float().softmax(-1)
    weights, ids = torch.topk(probs, topk, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


class MoE:
    def __init__(self, cfg: ModelConfig, par: Parallel, get: GetWeight, prefix: str, shared_mlp):
        """``shared_mlp(prefix)``: the family's dense MLP block over the shared expert's weights."""
        self.cfg, self.par = cfg, par
        self.router = get(prefix + ROUTER)
        n = experts_per_rank(cfg.num_experts, par.ep)
        self.experts = []                       # (global index, fc1 piece, fc2 piece), one expert read at a time
        for e in range(par.ep_rank * n, (par.ep_rank + 1) * n):
            p = prefix + EXPERT.format(e=e)
            self.experts.append((e, get(p + "linear_fc1.weight"), get(p + "linear_fc2.weight")))
        self.act, self.gated = ACTIVATIONS[cfg.activation], cfg.gated
        self.shared = shared_mlp(prefix + SHARED) if cfg.shared_expert_size else None
        self.shared_gate = get(prefix + SHARED + "gate_weight") if self.shared and cfg.shared_expert_gate else None

    def expert(self, x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
        return F.linear(activate(F.linear(x, fc1), self.act, self.gated), fc2)    # this rank's ETP partial sum

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = route(flat, self.router, self.cfg.moe_topk, self.cfg.moe_norm_topk)
        out = torch.zeros_like(flat)
        for e, fc1, fc2 in self.experts:
            token, slot = torch.where(ids == e)
            if token.numel() == 0:
                continue
            h = self.expert(flat[token], fc1, fc2) * weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        out = self.par.expert_all_reduce(out)
        if self.shared is not None:
            s = self.shared(flat)
            if self.shared_gate is not None:
                s = torch.sigmoid(F.linear(flat, self.shared_gate)) * s
            out = out + s
        return out.reshape(shape)
