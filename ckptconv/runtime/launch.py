"""Start the ranks: in-process for one rank, torch.multiprocessing locally, or join a group
that torchrun started (across nodes). Every path runs ``pipeline.run_rank``.

Locally the ranks meet through a FileStore in a private temp dir (no port to pick or race
for); single-threaded CPU ranks on Linux are forked, others spawned (default_start_method). A
rank that fails writes its error (typed ckptconv errors keep their type and fields) for the
launcher to re-raise; the others are then terminated.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .. import errors
from ..errors import CkptError, LayoutError
from .parallel import Parallel
from .pipeline import run_rank
from .spec import RunSpec

RESULT = "logits.safetensors"


class RankFailure(RuntimeError):
    """A rank failed with something other than a typed input error (or the run timed out)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def ranks_needed(spec: RunSpec) -> str:
    """'TP x PP = 2 x 2 = 4' (dense), 'PP x lcm(TP, ETP x EP) = 2 x lcm(2, 1 x 2) = 4' (MoE)."""
    lay = spec.layout
    if not lay.num_experts or lay.ep * lay.etp == 1:
        return f"TP x PP = {lay.tp} x {lay.pp} = {spec.world}"
    return f"PP x lcm(TP, ETP x EP) = {lay.pp} x lcm({lay.tp}, {lay.etp} x {lay.ep}) = {spec.world}"


def resolve_nproc(spec: RunSpec, nproc: int | str | None = "auto") -> int:
    """The number of ranks to start: the run's world (TP x PP, or PP x lcm(TP, ETP x EP) with
    experts), if ``nproc`` and the machine allow it."""
    need = spec.world
    what = f"the run needs {ranks_needed(spec)} ranks"
    if nproc not in (None, "auto") and int(nproc) < need:
        raise LayoutError(f"{what}, but --nproc is {int(nproc)}", path=spec.path,
                          fix=f"pass --nproc {need} (or auto), or re-shard on load with --tp/--pp")
    if spec.device == "cuda" and need > torch.cuda.device_count():
        raise LayoutError(f"{what}, but this machine has {torch.cuda.device_count()} GPUs", path=spec.path,
                          fix="run under torchrun across nodes, use --device cpu, or re-shard on load with --tp/--pp")
    return need


def run_local(spec: RunSpec, tokens: torch.Tensor, *, timeout_s: float = 1800.0,
              start_method: str | None = None) -> torch.Tensor:
    """Logits of ``tokens`` on ``spec.world`` local ranks (in-process when that is 1).
    ``start_method``: a multiprocessing start method (default: see default_start_method)."""
    if spec.world == 1:
        return run_rank(spec, tokens, Parallel.single(spec.device))
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ckptconv_run_") as tmp:
        ctx = mp.start_processes(_rank_main, args=(spec, tokens, tmp, timeout_s), nprocs=spec.world,
                                 join=False, start_method=start_method or default_start_method(spec.device, spec.world))
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.0, min(0.2, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise RankFailure(f"{spec.world} ranks did not finish within {timeout_s:.0f} s", _errors(tmp))
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _rank_error(tmp, e) from None
        finally:
            _stop(ctx)
        from safetensors.torch import load_file
        return load_file(Path(tmp) / RESULT)["logits"]


def run_distributed(spec: RunSpec, tokens: torch.Tensor, *, rank: int, local_rank: int, world: int,
                    init_method: str = "env://", timeout_s: float = 1800.0) -> torch.Tensor | None:
    """Join a process group started by a launcher such as torchrun (which passes RANK,
    LOCAL_RANK, WORLD_SIZE and the rendezvous through the environment). Logits on rank 0."""
    if world != spec.world:
        raise LayoutError(f"the launcher started {world} processes, the run needs {ranks_needed(spec)}",
                          path=spec.path, fix=f"start exactly {spec.world} processes (torchrun --nnodes x "
                                              "--nproc-per-node), or choose --tp/--pp to match")
    device = f"cuda:{local_rank}" if spec.device == "cuda" else "cpu"
    par = _init(spec, rank, device, init_method, timeout_s)
    try:
        return run_rank(spec, tokens, par)
    finally:
        par.close()


def _init(spec: RunSpec, rank: int, device: str, init_method: str, timeout_s: float) -> Parallel:
    lay = spec.layout
    return Parallel.init(lay.tp, lay.pp, rank, device, init_method=init_method, timeout_s=timeout_s,
                         ep=lay.ep, etp=lay.etp)


def threads_per_rank(world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // world)


def default_start_method(device: str, world: int) -> str:
    """fork for single-threaded CPU ranks on Linux (they start in milliseconds and set their
    thread count before any torch op, as DataLoader workers do); spawn otherwise, because CUDA
    does not survive a fork and OpenMP hangs in a forked child that uses more than one thread."""
    if device == "cpu" and threads_per_rank(world) == 1 and sys.platform.startswith("linux"):
        return "fork"
    return "spawn"


def _rank_main(rank: int, spec: RunSpec, tokens: torch.Tensor, tmp: str, timeout_s: float) -> None:
    try:
        torch.set_num_threads(threads_per_rank(spec.world))     # first: before any torch op
        device = f"cuda:{rank}" if spec.device == "cuda" else "cpu"
        par = _init(spec, rank, device, f"file://{tmp}/store", timeout_s)
        out = run_rank(spec, tokens, par)
        if out is not None:
            from safetensors.torch import save_file
            save_file({"logits": out.contiguous()}, str(Path(tmp) / RESULT))
        par.close()
    except BaseException as e:
        record = {"rank": rank, "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        if isinstance(e, CkptError):
            record["ckpt"] = {"what": e.what, "path": None if e.path is None else str(e.path),
                              "tensor": e.tensor, "fix": e.fix}
        part = Path(tmp) / f".error_rank{rank}.json.part"    # renamed: a reader never sees half a record
        part.write_text(json.dumps(record))
        os.replace(part, Path(tmp) / f"error_rank{rank}.json")
        raise


def _records(tmp: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("error_rank*.json"))]


def _errors(tmp: str) -> str:
    return "\n".join(f"--- rank {r['rank']} ---\n{r['traceback']}" for r in _records(tmp))


def _rank_error(tmp: str, exc: BaseException) -> Exception:
    """The typed error of the first rank that raised one, else a RankFailure with every traceback."""
    records = _records(tmp)
    for r in records:
        if "ckpt" in r:
            cls = getattr(errors, r["type"], None)
            cls = cls if isinstance(cls, type) and issubclass(cls, CkptError) else CkptError
            return cls(r["ckpt"]["what"], path=r["ckpt"]["path"], tensor=r["ckpt"]["tensor"], fix=r["ckpt"]["fix"])
    first = records[0] if records else None
    msg = f"rank {first['rank']} failed: {first['type']}: {first['message']}" if first else f"a rank died: {exc}"
    return RankFailure(msg.splitlines()[0], _errors(tmp))


def _stop(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
