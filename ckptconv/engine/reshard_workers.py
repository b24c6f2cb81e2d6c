"""Reshard with N workers: the output is split into shares, each written by one process.

* ``torch`` output: the unit of work is an output rank file ``(tp_rank, pp_rank)``. Whole pipeline
  stages are kept together while there are at least as many stages as workers (so a worker reads
  only the logical tensors of its stages, each once); otherwise single files are shared out.
* ``torch_dist`` output: one DCP checkpoint written with torch.distributed.checkpoint's own
  collective save on a gloo group of the workers: each worker plans and writes the logical
  tensors of its share (``__<rank>_<k>.distcp``), rank 0 gathers the plans and writes
  ``.metadata``, ``common.pt`` and ``metadata.json``.
Shares are balanced by bytes (largest first onto the least loaded worker) and depend only on the
plan, so every process computes the same partition: locally (``--workers N``, processes that
meet through a FileStore) and under ``torchrun`` (each rank of the job takes its share).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import errors
from ..errors import CkptError, LayoutError
from ..formats.detect import detect_format
from ..formats.megatron import megatron_writer, open_megatron_reader
from ..formats.megatron_args import gated_mlp
from ..plan.megatron_layout import tp_kind
from ..formats.megatron_as_hf import HF_ASSETS_DIR
from .memory import release_freed_memory
from .progress import progress
from .reshard_extra import carried_extra_state
from .reshard_manifest import ShareFingerprints, merge_parts
from .reshard_plan import VOCAB_ROWS, _repad, plan_reshard


@dataclass(frozen=True)
class ReshardJob:
    """Everything a worker needs to re-plan and write its share (plain, picklable values)."""
    src: str
    iteration: str | int
    ckpt_format: str
    plan_kwargs: dict
    show_progress: bool = False


def partition(sizes: dict, workers: int) -> list[list]:
    """Keys of ``sizes`` (key -> bytes) split into ``workers`` lists with balanced byte totals:
    largest first onto the least loaded worker (ties: lower key order, lower worker)."""
    order = sorted(sizes, key=lambda k: (-sizes[k], list(sizes).index(k)))
    loads, out = [0] * workers, [[] for _ in range(workers)]
    for k in order:
        w = min(range(workers), key=lambda i: (loads[i], i))
        out[w].append(k)
        loads[w] += sizes[k]
    return [sorted(ks, key=list(sizes).index) for ks in out]


def file_sizes(plan) -> dict[tuple[int, int, int], int]:
    """Bytes of every output rank file ``(tp_rank, pp_rank, ep_rank)`` of a torch-format plan."""
    lay = plan.layout
    gated = gated_mlp(plan.args)
    sizes = {k: 0 for k in lay.rank_files()}
    for m in plan.metas:
        kind = tp_kind(m.name, gated)
        n = m.dtype.itemsize * int(torch.Size(lay.local_shape(m.name, kind, m.shape)).numel())
        locs = [lay.locate(m.name)]
        if plan.tied and m.name == "embedding.word_embeddings.weight" and lay.pp > 1:
            locs.append(lay.locate("output_layer.weight"))
        for loc in locs:
            for k in lay.holders(loc):
                sizes[k] += n
    return sizes


def torch_shares(plan, workers: int) -> list[set[tuple[int, int, int]]]:
    sizes = file_sizes(plan)
    pp = plan.layout.pp
    if workers <= pp:
        stages = {p: sum(v for k, v in sizes.items() if k[1] == p) for p in range(pp)}
        return [{k for k in sizes if k[1] in ps} for ps in partition(stages, workers)]
    return [set(ks) for ks in partition(sizes, workers)]


def dist_shares(plan, workers: int) -> list[set[str]]:
    return [set(ns) for ns in partition({m.name: m.nbytes for m in plan.metas}, workers)]


def shares(plan, ckpt_format: str, workers: int) -> list[set]:
    return torch_shares(plan, workers) if ckpt_format == "torch" else dist_shares(plan, workers)


def write_share(reader, plan, out: Path, ckpt_format: str, *, rank: int = 0, world: int = 1, group=None,
                show_progress: bool = True) -> int:
    """Write worker ``rank``'s share of the plan into ``out`` (all of it when ``world`` is 1);
    rank 0 also copies the HF assets. Returns the number of logical tensors read."""
    kwargs = dict(args=plan.args, iteration=plan.iteration, impl=plan.impl, tie_copy=plan.tied,
                  gated_mlp=gated_mlp(plan.args), extra=dict(reader.meta),
                  extra_state=carried_extra_state(reader, plan, ckpt_format)[0])
    share = shares(plan, ckpt_format, world)[rank] if world > 1 else None
    if share is None:
        writer = megatron_writer(ckpt_format, out, plan.layout, plan.metas, **kwargs)
    elif ckpt_format == "torch":
        writer = megatron_writer(ckpt_format, out, plan.layout, plan.metas, files=share, **kwargs)
    else:
        from .reshard_dist import SharedDistWriter
        writer = SharedDistWriter(out, plan.layout, plan.metas, share=share, rank=rank, group=group, **kwargs)
    wanted = [m for m in plan.metas if share is None or (writer.holds(m.name) if ckpt_format == "torch"
                                                         else m.name in share)]
    fingerprints = ShareFingerprints(reader, plan.padded_vocab[0])
    with writer:
        for m in progress(wanted, desc="reshard" if world == 1 else f"reshard {rank}", enabled=show_progress):
            t = reader.read(m.name)
            writer.write(m.name, _repad(t, m.shape[0]) if m.name in VOCAB_ROWS else t)
            fingerprints.add(m.name, t)
            del t
            release_freed_memory()
    fingerprints.write(out, rank, world)
    assets = reader.root / HF_ASSETS_DIR
    if rank == 0 and assets.is_dir():
        shutil.copytree(assets, out / HF_ASSETS_DIR)
    return len(wanted)


def run_job(job: ReshardJob, out: Path, *, rank: int = 0, world: int = 1, group=None) -> int:
    src = Path(job.src)
    with open_megatron_reader(src, detect_format(src), job.iteration) as reader:
        plan = plan_reshard(reader, **job.plan_kwargs)
        return write_share(reader, plan, out, job.ckpt_format, rank=rank, world=world, group=group,
                           show_progress=job.show_progress and rank == 0)


# ------------------------------------------------------------------------------ local workers
def run_local(job: ReshardJob, out: Path, workers: int, *, timeout_s: float = 24 * 3600.0) -> None:
    """``workers`` local processes write their shares of ``job`` into ``out``."""
    import torch.multiprocessing as mp

    from ..runtime.launch import default_start_method

    with tempfile.TemporaryDirectory(prefix="ckptconv_reshard_") as tmp:
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
    merge_parts(out, workers)


def _worker_main(rank: int, job: ReshardJob, out: str, world: int, tmp: str, timeout_s: float) -> None:
    import datetime

    import torch.distributed as dist

    from ..runtime.launch import threads_per_rank

    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a forked CLI handler would turn terminate() into an error
    try:
        torch.set_num_threads(threads_per_rank(world))
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            run_job(job, Path(out), rank=rank, world=world, group=dist.group.WORLD)
        finally:
            dist.destroy_process_group()
    except BaseException as e:
        (Path(tmp) / f"error_rank{rank}.json").write_text(json.dumps(error_record(rank, e)))
        raise


def error_record(rank: int, e: BaseException) -> dict:
    rec = {"rank": rank, "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
    if isinstance(e, CkptError):
        rec["ckpt"] = {"what": e.what, "path": None if e.path is None else str(e.path), "tensor": e.tensor,
                       "fix": e.fix}
    return rec


def raise_record(records: list[dict], fallback: str) -> None:
    """Re-raise the first typed error of the records (else a RuntimeError with every traceback)."""
    for r in records:
        if "ckpt" in r:
            cls = getattr(errors, r["type"], None)
            cls = cls if isinstance(cls, type) and issubclass(cls, CkptError) else CkptError
            raise cls(r["ckpt"]["what"], path=r["ckpt"]["path"], tensor=r["ckpt"]["tensor"], fix=r["ckpt"]["fix"])
    details = "\n".join(f"--- worker {r['rank']} ---\n{r['traceback']}" for r in records)
    first = records[0] if records else None
    raise RuntimeError((f"reshard worker {first['rank']} failed: {first['type']}: {first['message']}"
                        if first else fallback) + ("\n" + details if details else ""))


def _worker_error(tmp: str, exc: BaseException) -> Exception:
    records = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("error_rank*.json"))]
    try:
        raise_record(records, f"a reshard worker died: {exc}")
    except Exception as e:  # noqa: BLE001 - returned to be raised by the caller
        return e
    return RuntimeError("unreachable")


# ------------------------------------------------------------------------------ torchrun
def run_torchrun(job: ReshardJob, dst: Path, *, overwrite: bool = False) -> int:
    """This process is one rank of a torchrun job (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment): rank 0 opens the temporary output next to ``dst``, every rank writes its share,
    rank 0 renames the output into place once every rank has succeeded. Returns the world size."""
    import datetime

    import torch.distributed as dist

    from ..formats.atomic import atomic_output_dir

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
            ctx = atomic_output_dir(dst, sources=[Path(job.src)], overwrite=overwrite)
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


def _share_and_report(job: ReshardJob, out: Path, rank: int, world: int) -> None:
    """Write this rank's share, then learn every rank's outcome; raise the first failure anywhere."""
    import torch.distributed as dist

    try:
        run_job(job, out, rank=rank, world=world, group=dist.group.WORLD)
        mine = None
    except BaseException as e:  # noqa: BLE001 - shared with the other ranks below
        mine = error_record(rank, e)
    records: list = [None] * world
    dist.all_gather_object(records, mine)
    failed = [r for r in records if r]
    if failed:
        raise_record(failed, "a rank failed")


def check_workers(workers: int) -> None:
    if workers < 1:
        raise LayoutError(f"--workers {workers} must be >= 1", fix="pass --workers 1 or more")


def env_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise LayoutError("--launcher torchrun needs RANK and WORLD_SIZE in the environment",
                          fix="start the command with torchrun (python -m torch.distributed.run)") from None
