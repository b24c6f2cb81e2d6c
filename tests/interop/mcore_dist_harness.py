"""Load a Megatron-Core distributed (``torch_dist``) checkpoint with REAL megatron-core.

Test helper (interop tests only). ``megatron_dist_logits(ckpt, tokens, tp=, pp=, vpp=)`` spawns
``tp * pp`` gloo ranks; each builds a megatron-core ``GPTModel`` (local spec) from the ``args``
of the common state (megatron's own ``load_common_state_dict``: common.pt in 0.16, the
``common_state`` item in 0.19) but at the TP/PP/VPP asked for (which need not be the ones the checkpoint was
written with), loads it with ``megatron.core.dist_checkpointing.load(model.sharded_state_dict(),
ITER_DIR)`` (with ``verify_integrity=True`` when asked: megatron-core >= 0.17.1) followed by
``load_state_dict(strict=True)`` -- as Megatron-LM does -- runs the
pipeline forward and returns the all-gathered logits (trimmed to ``args.vocab_size``).

Process orchestration, model construction and CPU shims are reused from ``mcore_harness`` /
``mcore_cpu_shims``; megatron is imported only in the rank processes.
"""
from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path

import torch

import mcore_harness as mh

__all__ = ["megatron_dist_logits", "read_dist_args", "read_dist_common", "dist_iteration_dir", "mcore_version",
           "has_integrity_check"]


def mcore_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the megatron-core this test run uses (each CI venv has one)."""
    import re
    from importlib.metadata import version

    return tuple(int(re.match(r"\d+", p).group()) for p in (version("megatron-core").split(".") + ["0"])[:3])


def has_integrity_check() -> bool:
    """``dist_checkpointing.load(..., verify_integrity=True)`` exists from megatron-core 0.17.1 on
    (absent in 0.17.0's source; present in 0.17.1, 0.18.2, 0.19.2)."""
    return mcore_version() >= (0, 17, 1)


def dist_iteration_dir(ckpt_root: Path | str, iteration="latest") -> Path:
    root = Path(ckpt_root)
    if (root / "metadata.json").is_file():
        return root
    return mh.resolve_iteration_dir(root, iteration)


def read_dist_common(iter_dir: Path | str) -> dict:
    """The common state as megatron-core itself loads it (``load_common_state_dict``), with the
    classes megatron-core registers as weights-only-safe at import (registered again here: a test
    that used ``torch.serialization.safe_globals(...)`` around the first import undid them)."""
    import warnings

    from megatron.core import dist_checkpointing
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # 0.19: "load_common is deprecated" on common.pt
        return dist_checkpointing.load_common_state_dict(str(iter_dir))


def read_dist_args(iter_dir: Path | str):
    return read_dist_common(iter_dir)["args"]


def _dist_worker(rank, world, tp, pp, vpp, port, iter_dir, tokens_list, out_dir, ep=1, etp=1,
                 verify_integrity=False):
    err_path = Path(out_dir) / f"error_rank{rank}.txt"
    try:
        import argparse

        import mcore_cpu_shims as shims

        shims.apply_cpu_shims()
        ps = shims.init_megatron_parallel(rank, world, tp, pp, port, vpp=vpp, ep=ep, etp=etp)
        from megatron.core import dist_checkpointing

        tp_rank = ps.get_tensor_model_parallel_rank()
        args = read_dist_args(iter_dir)
        if getattr(args, "num_experts", None):
            shims.apply_moe_shim()
            args = argparse.Namespace(**{**vars(args), "expert_model_parallel_size": ep,
                                         "expert_tensor_parallel_size": etp})
        torch.manual_seed(1000 + rank)       # a different random init: every weight must come from the load
        chunks = mh._build_chunks(args, mh._transformer_config(args, tp, pp, vpp), vpp)
        keys = ["model"] if vpp is None else [f"model{v}" for v in range(vpp)]
        sharded = {k: m.sharded_state_dict() for k, m in zip(keys, chunks)}
        try:
            check = {"verify_integrity": True} if verify_integrity else {}
            loaded = dist_checkpointing.load(sharded, str(iter_dir), **check)
        except Exception as e:
            raise mh.MegatronHarnessError(f"rank {rank}: dist_checkpointing.load failed: {e}") from e
        for k, m in zip(keys, chunks):
            m.load_state_dict(loaded[k], strict=True)
        out = shims.pipeline_forward(chunks, torch.tensor(tokens_list, dtype=torch.long), args.hidden_size)
        if out is not None:
            logits = shims.gather_tp_logits(out)
            if tp_rank == 0:
                vocab = getattr(args, "vocab_size", None)
                logits = logits[..., :vocab] if vocab else logits
                torch.save(logits.contiguous().clone(), Path(out_dir) / "logits.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException as e:
        err_path.write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        raise


def megatron_dist_logits(ckpt_root: Path | str, tokens: torch.Tensor, *, tp: int = 1, pp: int = 1,
                         vpp: int | None = None, iteration="latest", timeout_s: float = 180.0,
                         ep: int = 1, etp: int = 1, verify_integrity: bool = False) -> torch.Tensor:
    """Logits [batch, seq, vocab] of a torch_dist checkpoint loaded by real megatron-core at
    (tp, pp, vpp[, ep, etp]), with megatron's integrity check (>= 0.17.1) when ``verify_integrity``.
    Raises ``MegatronHarnessError`` with the failing rank's message."""
    iter_dir = dist_iteration_dir(ckpt_root, iteration)
    tokens = torch.as_tensor(tokens)
    mh._configure_forkserver()
    for attempt in range(3):
        try:
            return _run(mh.world_size(tp, pp, ep, etp), tp, pp, vpp, iter_dir, tokens, timeout_s, ep, etp,
                        verify_integrity)
        except mh.MegatronHarnessError as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def _run(world, tp, pp, vpp, iter_dir, tokens, timeout_s, ep=1, etp=1, verify_integrity=False) -> torch.Tensor:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="mcore_dist_harness_") as out_dir:
        ctx = mp.start_processes(
            _dist_worker, args=(world, tp, pp, vpp, mh._free_port(), str(iter_dir), tokens.tolist(), out_dir, ep, etp,
                                verify_integrity),
            nprocs=world, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if ctx.join(timeout=0.2):
                        break
                except Exception as e:  # ProcessRaisedException / ProcessExitedException
                    raise mh.MegatronHarnessError(mh._collect_errors(out_dir, world) or str(e)) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks did not finish within {timeout_s}s\n"
                                       + mh._collect_errors(out_dir, world))
        finally:
            mh._kill_all(ctx)
        path = Path(out_dir) / "logits.pt"
        if not path.is_file():
            raise mh.MegatronHarnessError("workers finished but produced no logits")
        return torch.load(path, map_location="cpu", weights_only=True)
