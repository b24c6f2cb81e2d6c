"""The bundled parallel runtime: rerun a (converted, sharded) checkpoint and get its logits.

One table-driven decoder for every family ckptconv converts (Mixture-of-Experts included)
built from column-, row- and vocab-parallel layers, expert-parallel MoE layers and a pipeline
stage loop (with virtual chunks) on torch.distributed: gloo on CPU, NCCL on GPU, one code
path. Each rank loads only its own shard from disk.
No Megatron, Transformer Engine or Apex is imported.

    logits = ckptconv.runtime.logits("ckpt/", torch.tensor([[1, 2, 3]]))   # [1, 3, vocab]

See docs/runtime.md for the CLI (`ckptconv run`) and running under torchrun across nodes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .launch import RankFailure, resolve_nproc, run_distributed, run_local
from .spec import RunSpec, prepare_run

__all__ = ["logits", "prepare_run", "check_tokens", "resolve_nproc", "run_local", "run_distributed",
           "RunSpec", "RankFailure"]


def check_tokens(tokens, vocab_size: int) -> torch.Tensor:
    """Token ids as a [batch, seq] int64 tensor, every id in [0, vocab_size)."""
    t = torch.as_tensor(tokens)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"tokens must be a non-empty [batch, seq] integer tensor, got {tuple(t.shape)} {t.dtype}")
    bad = t[(t < 0) | (t >= vocab_size)]
    if bad.numel():
        raise ValueError(f"token id {int(bad[0])} is outside the model's vocabulary [0, {vocab_size})")
    return t.to(torch.int64).contiguous()


def logits(path: str | Path, tokens, *, nproc: int | str = "auto", dtype: torch.dtype = torch.float32,
           tp: int | None = None, pp: int | None = None, vpp: int | None = None,
           ep: int | None = None, etp: int | None = None,
           iteration: str | int = "latest", hf_config: dict | None = None, device: str = "auto",
           timeout_s: float = 1800.0) -> torch.Tensor:
    """Logits [batch, seq, vocab] (float32, CPU; trimmed to the true vocab) of ``tokens`` under
    the checkpoint at ``path`` (Megatron per-rank torch at any TP/PP/VPP/EP/ETP, other Megatron
    formats with a reader, or HF), computed in ``dtype`` (float32 or bfloat16) on TP x PP
    local ranks (PP x lcm(TP, ETP x EP) with experts). ``tp``/``pp``/``vpp``/``ep``/``etp``
    re-shard on load (default: the checkpoint's layout; all 1 for HF). Raises LayoutError when
    the run needs more ranks than ``nproc`` allows."""
    spec = prepare_run(path, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, iteration=iteration, hf_config=hf_config,
                       dtype=dtype, device=device)
    resolve_nproc(spec, nproc)
    return run_local(spec, check_tokens(tokens, spec.cfg.vocab_size), timeout_s=timeout_s)
