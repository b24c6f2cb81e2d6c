"""CPU workarounds for running real megatron-core 0.16.1 on a CPU-only machine.

TEST-SIDE ONLY. These monkeypatches are applied inside the spawned worker processes
of the interop harness (and in the fixture script); they must never be imported by
the ``ckptconv`` package.

What each shim is for (observed with megatron-core 0.16.1, torch 2.13 CPU):

* ``torch.cuda.current_device -> "cpu"``: ``RotaryEmbedding.get_emb`` moves ``inv_freq``
  to ``torch.cuda.current_device()`` unconditionally; the TP all-gather buffers use it too.
* ``torch.Tensor.cuda -> identity``: with tied embeddings and PP > 1,
  ``LanguageModule.setup_embeddings_and_output_layer`` does
  ``weight.data = weight.data.cuda()`` before all-reducing the embedding copy between
  the first and last stage.
* ``initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)``: official flag;
  replaces ``model_parallel_cuda_manual_seed`` (which needs CUDA RNG state).
* an explicit bool causal mask: ``mask=None`` makes megatron allocate one on "cuda".
* ``moe_utils.te_general_gemm = None`` (Mixture-of-Experts only, ``apply_moe_shim``): undefined
  without Transformer Engine, a NameError in the router's first forward; None takes torch.mm.
"""
from __future__ import annotations

import os
import warnings

import torch


def apply_cpu_shims() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]


def apply_moe_shim() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    moe_utils.te_general_gemm = None


def init_megatron_parallel(
    rank: int,
    world_size: int,
    tp: int,
    pp: int,
    port: int,
    vpp: int | None = None,
    timeout_s: float = 120.0,
    ep: int = 1,
    etp: int | None = None,
):
    """gloo process group + megatron model-parallel state + CPU-safe RNG tracker."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return ps


def causal_mask(seq: int) -> torch.Tensor:
    """[1, 1, s, s] bool mask, True = masked out (megatron convention)."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]


def gather_tp_logits(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocab-parallel logits [b, s, V/tp] over the TP group -> [b, s, V]."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def pipeline_forward(models, tokens: torch.Tensor, hidden_size: int, dtype=torch.float32):
    """Run the (virtual-)pipeline forward by hand with gloo send/recv of [s, b, h].

    ``models`` is this rank's list of model chunks (len == vpp, or 1 without virtual
    pipeline). Chunks execute in global order: chunk v of stage p runs after chunk v of
    stage p-1 and after chunk v-1 of the last stage. Returns the vocab-parallel logits
    on the last stage (last chunk), else None.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    pp = ps.get_pipeline_model_parallel_world_size()
    p = ps.get_pipeline_model_parallel_rank()
    n_chunks = len(models)
    pos = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    mask = causal_mask(s)
    out = None
    for v, model in enumerate(models):
        first = p == 0 and v == 0
        last = p == pp - 1 and v == n_chunks - 1
        if not first:
            if pp == 1:  # previous chunk lives on this very rank
                buf = out
            else:
                buf = torch.empty(s, b, hidden_size, dtype=dtype)
                dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        with torch.no_grad():
            out = model(tokens, pos, mask)
        if not last and pp > 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = None
    return out
