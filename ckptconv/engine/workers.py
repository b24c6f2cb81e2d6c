"""Write one conversion's output with N processes: local workers or torchrun ranks.

Every converting command runs the same way. The command plans from metadata; with more than one
worker it describes itself as a `WorkerJob` (the public function and its arguments) and
`run_workers` runs it: the output directory is opened once (``formats.atomic``: a hidden sibling
renamed into place), each worker re-runs the command with ``share=Share(rank, world)``,
writing only the output files of its share (``plan.shares``) and reading only the source tensors
those files need, and once every worker has succeeded the manifest parts are merged and the
directory is renamed into place. A failing worker fails the whole command with its typed error;
nothing is left behind.

* local (``--workers N``): N processes started with ``torch.multiprocessing``; where they must
  meet (the collective DCP save of torch_dist output), a gloo group through a FileStore in a
  private temporary directory.
* torchrun (``--launcher torchrun``): this process is one rank (RANK/WORLD_SIZE/MASTER_ADDR from
  the environment); rank 0 opens the output and broadcasts its path, every rank writes its share,
  all ranks exchange their outcome, rank 0 commits. On several machines DST must be on a
  filesystem every node sees (docs/cli.md).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import errors
from ..errors import CkptError, LayoutError, WriteFailed, os_error_in_chain
from ..formats.atomic import atomic_output_dir
from .manifest_parts import merge_parts

AUTO = "auto"
LAUNCHERS = ("local", "torchrun")
# what the caller of a job controls, not the job itself
_CONTROL = ("workers", "launcher", "share", "overwrite", "dry_run")


@dataclass
class Share:
    """Which worker this process is. ``group``: the workers' gloo process group, made by
    ``connect`` on first use (only a collective DCP save needs one: workers writing per-rank or
    safetensors files never meet)."""
    rank: int
    world: int
    connect: Callable[[], Any] | None = None
    _group: Any = field(default=None, repr=False)

    @property
    def group(self):
        if self._group is None and self.connect is not None:
            self._group = self.connect()
        return self._group

    @property
    def lead(self) -> bool:
        """The worker that writes what exists once (configs, assets, commit files)."""
        return self.rank == 0


@dataclass(frozen=True)
class WorkerJob:
    """A command as a worker re-runs it: ``fn(*args, out, share=share, **kwargs)`` (``fn`` a
    module-level function, so the job pickles by reference)."""
    fn: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, fn: Callable, *args, **kwargs) -> "WorkerJob":
        return cls(fn, args, {k: v for k, v in kwargs.items() if k not in _CONTROL})

    def run(self, out: Path, share: Share) -> Any:
        kwargs = dict(self.kwargs)
        if not share.lead and "show_progress" in kwargs:
            kwargs["show_progress"] = False
        return self.fn(*self.args, out, share=share, **kwargs)


def check_workers(workers: int | str) -> None:
    if workers != AUTO and (not isinstance(workers, int) or workers < 1):
        raise LayoutError(f"--workers {workers} must be >= 1 or 'auto'", fix="pass --workers 1 or more, or auto")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# a worker process: its tensors (the command's memory forecast) plus the interpreter, torch, readers
WORKER_OVERHEAD = 400 * 2**20
# below this many output bytes a second process costs more (start, re-plan, gloo) than it saves
AUTO_MIN_BYTES = 2 * 2**30
# one worker already keeps more than one core busy (its reading thread, the write-behind thread, the
# fingerprint/NaN check thread, torch's intra-op threads: 1.04 cores measured, bench/results_workers.md),
# and a second worker showed no reliable gain on 2 cores
CPUS_PER_WORKER = 2


def resolve_workers(requested: int | str, *, units: int, total_bytes: int, worker_bytes: int,
                    cpus: int | None = None, memory: int | None = None) -> int:
    """The number of workers to run. An explicit N is capped at the number of output units (more
    would have nothing to write). ``auto``: 1 below AUTO_MIN_BYTES of output, else the smallest of
    usable CPUs // CPUS_PER_WORKER, the output units and what fits in available memory at
    ``worker_bytes`` + WORKER_OVERHEAD per worker."""
    check_workers(requested)
    units = max(1, units)
    if requested != AUTO:
        return min(requested, units)
    if total_bytes < AUTO_MIN_BYTES:
        return 1
    cpus = usable_cpus() if cpus is None else cpus
    memory = available_memory() if memory is None else memory
    fit = units if memory is None else max(1, memory // (worker_bytes + WORKER_OVERHEAD))
    return max(1, min(cpus // CPUS_PER_WORKER, units, fit))


@contextmanager
def output_dir(dst: Path, *, sources: list[Path], overwrite: bool, share: Share | None) -> Iterator[Path]:
    """Where a command writes: a fresh atomic output directory, or (as a worker) the directory the
    coordinator opened, written into as it is."""
    if share is not None:
        yield Path(dst)
        return
    with atomic_output_dir(Path(dst), sources=sources, overwrite=overwrite) as tmp:
        yield tmp


def run_workers(job: WorkerJob, dst: Path, *, sources: list[Path], overwrite: bool, workers: int,
                launcher: str = "local") -> int:
    """Write ``job``'s output into ``dst`` with ``workers`` local processes, or as this rank of a
    torchrun job; returns the number of workers."""
    if launcher == "torchrun":
        return run_torchrun(job, Path(dst), sources=sources, overwrite=overwrite)
    with atomic_output_dir(Path(dst), sources=sources, overwrite=overwrite) as tmp:
        run_local(job, tmp, workers)
        merge_parts(tmp, workers)
    return workers


# ------------------------------------------------------------------------------ local workers
def run_local(job: WorkerJob, out: Path, workers: int, *, timeout_s: float = 24 * 3600.0) -> None:
    """``workers`` local processes write their shares of ``job`` into ``out``."""
    import torch.multiprocessing as mp

    from ..runtime.launch import default_start_method

    with tempfile.TemporaryDirectory(prefix="ckptconv_workers_") as tmp:
        ctx = mp.start_processes(_worker_main, args=(job, str(out), workers, tmp, timeout_s), nprocs=workers,
                                 join=False, start_method=default_start_method("cpu", workers))
        try:
            while not ctx.join(timeout=0.2):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _worker_error(tmp, e) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=5)


def _gloo(tmp: str, rank: int, world: int, timeout_s: float):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD


def _worker_main(rank: int, job: WorkerJob, out: str, world: int, tmp: str, timeout_s: float) -> None:
    from ..runtime.launch import threads_per_rank

    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a forked CLI handler would turn terminate() into an error
    try:
        torch.set_num_threads(threads_per_rank(world))
        share = Share(rank, world, functools.partial(_gloo, tmp, rank, world, timeout_s))
        try:
            job.run(Path(out), share)
        finally:
            if share._group is not None:
                import torch.distributed as dist
                dist.destroy_process_group()
    except BaseException as e:
        part = Path(tmp) / f".error_rank{rank}.part"
        part.write_text(json.dumps(error_record(rank, e)))
        part.rename(Path(tmp) / f"error_rank{rank}.json")       # the launcher never reads half a record
        raise


def error_record(rank: int, e: BaseException) -> dict:
    rec = {"rank": rank, "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    if isinstance(e, CkptError):
        rec["ckpt"] = {"what": e.what, "path": None if e.path is None else str(e.path), "tensor": e.tensor,
                       "fix": e.fix}
    os_error = os_error_in_chain(e)
    if os_error is not None:
        rec["os"] = {"errno": os_error.errno, "strerror": os_error.strerror or str(os_error),
                     "filename": None if os_error.filename is None else str(os_error.filename)}
    return rec


def raise_record(records: list[dict], fallback: str) -> None:
    """Re-raise the first failure of the records: a typed error as itself, an I/O error as an
    OSError (both one line in the CLI), anything else as a RuntimeError with every traceback."""
    for r in records:
        if "ckpt" in r:
            cls = getattr(errors, r["type"], None)
            cls = cls if isinstance(cls, type) and issubclass(cls, CkptError) else CkptError
            raise cls(r["ckpt"]["what"], path=r["ckpt"]["path"], tensor=r["ckpt"]["tensor"], fix=r["ckpt"]["fix"])
    for r in records:
        if "os" in r:
            raise OSError(r["os"]["errno"], r["os"]["strerror"], r["os"]["filename"])
    details = "\n".join(f"--- worker {r['rank']} ---\n{r['traceback']}" for r in records)
    first = records[0] if records else None
    raise RuntimeError((f"worker {first['rank']} failed: {first['type']}: {first['message']}"
                        if first else fallback) + ("\n" + details if details else ""))


def _worker_error(tmp: str, exc: BaseException) -> Exception:
    records = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("error_rank*.json"))]
    if not records:        # killed without a word (e.g. by the kernel's OOM killer)
        return WriteFailed(f"a worker process died: {exc}", fix="rerun with fewer --workers (memory?) or --workers 1")
    try:
        raise_record(records, f"a worker died: {exc}")
    except Exception as e:  # noqa: BLE001 - returned to be raised by the caller
        return e
    return RuntimeError("unreachable")


# ------------------------------------------------------------------------------ torchrun
def env_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise LayoutError("--launcher torchrun needs RANK and WORLD_SIZE in the environment",
                          fix="start the command with torchrun (python -m torch.distributed.run)") from None


def run_torchrun(job: WorkerJob, dst: Path, *, sources: list[Path], overwrite: bool = False) -> int:
    """This process is one rank of a torchrun job: rank 0 opens the temporary output next to
    ``dst``, every rank writes its share, rank 0 merges the manifest parts and renames the output
    into place once every rank has succeeded. Returns the world size."""
    import torch.distributed as dist

    rank, world = env_rank()
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=24))
    try:
        if rank != 0:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if isinstance(box[0], dict):      # rank 0 could not open the output
                raise_record([box[0]], "rank 0 failed")
            _share_and_report(job, Path(box[0]), rank, world)
            return world
        try:
            ctx = atomic_output_dir(dst, sources=sources, overwrite=overwrite)
            tmp = ctx.__enter__()
        except BaseException as e:
            dist.broadcast_object_list([error_record(0, e)], src=0)
            raise
        dist.broadcast_object_list([str(tmp)], src=0)
        try:
            _share_and_report(job, tmp, rank, world)
            merge_parts(tmp, world)
        except BaseException as e:
            if not ctx.__exit__(type(e), e, e.__traceback__):
                raise
        else:
            ctx.__exit__(None, None, None)
        return world
    finally:
        dist.destroy_process_group()


def _share_and_report(job: WorkerJob, out: Path, rank: int, world: int) -> None:
    """Write this rank's share, then learn every rank's outcome; raise the first failure anywhere."""
    import torch.distributed as dist

    try:
        job.run(out, Share(rank, world, lambda: dist.group.WORLD))
        mine = None
    except BaseException as e:  # noqa: BLE001 - shared with the other ranks below
        mine = error_record(rank, e)
    records: list = [None] * world
    dist.all_gather_object(records, mine)
    failed = [r for r in records if r]
    if failed:
        raise_record(failed, "a rank failed")


# ------------------------------------------------------------------------------ in a command
def plan_workers(summary: dict, requested: int | str, launcher: str, *, units: int, share: Share | None) -> int:
    """Decide how many workers write this command's output and record it in ``summary``
    (``workers``): the torchrun world, a worker's world, or `resolve_workers`."""
    if launcher not in LAUNCHERS:
        raise LayoutError(f"unknown launcher {launcher!r}", fix=f"use one of {LAUNCHERS}")
    if share is not None:
        n = share.world
    elif launcher == "torchrun":
        n = env_rank()[1]
    else:
        n = resolve_workers(requested, units=units, total_bytes=summary.get("bytes_written", 0),
                            worker_bytes=summary.get("memory_forecast_bytes", 0))
    summary["workers"] = n
    return n


def fan_out(job: WorkerJob, dst: Path, workers: int, *, sources: list[Path], overwrite: bool, launcher: str,
            share: Share | None) -> bool:
    """Run ``job`` on its workers when the output is written by several processes (True: done,
    the output is in place); False: this process writes it (alone, or as one worker)."""
    if share is not None or (workers == 1 and launcher != "torchrun"):
        return False
    run_workers(job, dst, sources=sources, overwrite=overwrite, workers=workers, launcher=launcher)
    return True


def worker_command(fn: Callable) -> Callable:
    """Decorate a module-level command ``fn(src, dst, **kwargs)`` so that it hands the engine
    ``job=``: itself as a worker re-runs it (the decorated function pickles by its name)."""
    @functools.wraps(fn)
    def command(src, dst, **kwargs):
        return fn(src, dst, job=WorkerJob.of(command, src, **kwargs), **kwargs)
    return command
