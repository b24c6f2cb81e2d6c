"""Have REAL megatron-core build, initialise and save a model in Megatron-LM's per-rank
``torch`` format (test helper, interop tests only).

``megatron_saved(args, root, tokens)`` spawns ``tp * pp`` gloo ranks; each builds a
megatron-core GPTModel (local spec) from ``args`` exactly as ``mcore_harness`` does, lets
megatron initialise it (use_cpu_initialization, seeded per pipeline stage like Megatron-LM),
shifts every 1-D parameter by a seeded random amount (so norm or bias mix-ups show), saves
``{"model": GPTModel.state_dict(), "args", "checkpoint_version", "iteration"}`` as
Megatron-LM's save_checkpoint does for ``--ckpt-format torch``, and returns the logits that
very model computes for ``tokens``.
"""
from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

import torch

import mcore_harness as H

ITERATION = 1


def _save_worker(rank, world, tp, pp, port, args, root, tokens_list, out_dir):
    try:
        import mcore_cpu_shims as shims

        shims.apply_cpu_shims()
        ps = shims.init_megatron_parallel(rank, world, tp, pp, port, vpp=None)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        torch.manual_seed(1234 + 100 * pp_rank)         # the same on every TP rank of a stage
        (model,) = H._build_chunks(args, H._transformer_config(args, tp, pp, None), None)
        g = torch.Generator().manual_seed(7 + 100 * pp_rank)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        path = H.rank_file(Path(root) / f"iter_{ITERATION:07d}", tp_rank, pp_rank, pp)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "args": args, "checkpoint_version": 3.0,
                    "iteration": ITERATION}, path)
        out = shims.pipeline_forward([model], torch.tensor(tokens_list, dtype=torch.long), args.hidden_size)
        if out is not None:
            logits = shims.gather_tp_logits(out)
            if tp_rank == 0:
                torch.save(logits[..., : args.vocab_size].contiguous().clone(), Path(out_dir) / "logits.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException as e:
        (Path(out_dir) / f"error_rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        raise


def megatron_saved(args, root: Path, tokens: torch.Tensor, *, timeout_s: float = 180.0) -> torch.Tensor:
    """Save a real megatron-core model described by ``args`` under ``root``; its logits."""
    import torch.multiprocessing as mp

    tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
    world = tp * pp
    H._configure_forkserver()
    with tempfile.TemporaryDirectory(prefix="mcore_save_") as out_dir:
        ctx = mp.start_processes(_save_worker, args=(world, tp, pp, H._free_port(), args, str(root),
                                                     tokens.tolist(), out_dir),
                                 nprocs=world, join=False, start_method="forkserver")
        H.join_ranks(ctx, out_dir, world, timeout_s)
        (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
        return torch.load(Path(out_dir) / "logits.pt", map_location="cpu", weights_only=True)
