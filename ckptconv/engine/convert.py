"""Execute conversions tensor by tensor: any HF-named source -> Megatron, any source -> HF.

At most one logical tensor (its sources, its transformed form and one rank slice) is in
memory at a time; readers read headers first and slice, writers stream.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..families import family_for_hf
from ..formats.detect import detect_format
from ..formats.hf_config_only import open_hf_or_config
from ..formats.hf_hub import resolve_hf_source
from ..errors import UnknownFormat
from ..formats.megatron import WRITERS, open_megatron_reader
from ..formats.megatron_args import build_args
from ..ops import get_op
from ..plan.megatron_layout import MegatronLayout, pad_vocab_size
from ..plan.memory import memory_forecast
from ..plan.output_shards import parse_size
from ..plan.planner import plan_hf_to_megatron
from ..types import TensorMeta, dtype_name
from ..verify.manifest import ManifestBuilder
from .checks import StreamChecks, checks_closed
from .forecast_summary import time_forecast
from .memory import release_freed_memory
from ..formats.hf_config_file import load_hf_config_arg  # noqa: F401  (re-exported for the CLI)
from ..formats.megatron_as_hf import HF_ASSETS_DIR, MegatronAsHF
from .packed_experts import has_packed_experts, with_hub_experts
from .manifest_parts import write_fingerprints
from .overlap import background_integrity_check, behind, finish_integrity_check
from .progress import progress
from .budget import DEFAULT_BUDGET, Budget
from .streams import hf_stream, hf_streams, item_streams, megatron_item_stream
from .share_writers import hf_files, hf_share_writer, megatron_share_writer
from .workers import Share, WorkerJob, fan_out, output_dir, plan_workers, worker_command


def source_to_megatron(source, dst: str | Path, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                       impl: str = "transformer_engine", dtype: torch.dtype | None = None,
                       divisible_by: int = 128, iteration: int | str = "release", ckpt_format: str = "torch_dist",
                       overwrite: bool = False, dry_run: bool = False, allow_nonfinite: bool = False,
                       show_progress: bool = True, first_stage_layers: int | None = None,
                       last_stage_layers: int | None = None, ep: int = 1, etp: int = 1,
                       moe_grouped_gemm: bool = False, workers: int | str = 1, launcher: str = "local",
                       share: Share | None = None, job: WorkerJob | None = None,
                       memory_budget: int = DEFAULT_BUDGET) -> dict:
    """Write an HF-named source (HF, DeepSpeed, ... see ckptconv.sources) as a Megatron checkpoint.
    ``workers`` > 1 / ``launcher="torchrun"``: ``job`` (this command as a worker re-runs it) writes
    the output on several processes (engine.workers); ``share``: write only that worker's files."""
    hf_cfg = source.config()
    family = family_for_hf(hf_cfg, Path(source.path) / "config.json")
    cfg = family.from_hf_config(hf_cfg)
    source = with_hub_experts(source, family, cfg)
    layout = MegatronLayout(tp, pp, cfg.num_layers, vpp, first_stage_layers, last_stage_layers,
                            cfg.num_experts, ep, etp)
    padded = pad_vocab_size(cfg.vocab_size, divisible_by, tp)
    plan = plan_hf_to_megatron(family, cfg, source.tensors(), layout, padded, dtype)
    summary = {"source": str(source.path), "destination": str(dst), "format": f"megatron_{ckpt_format}",
               **plan.summary()}
    by_rows = [item_streams(it, source) for it in plan.items]
    summary.update(memory_forecast(memory_budget, [it.megatron.nbytes for it, s in zip(plan.items, by_rows) if s],
                                   [it.megatron.nbytes for it, s in zip(plan.items, by_rows) if not s]))
    if ckpt_format not in WRITERS:
        raise UnknownFormat(f"unknown Megatron checkpoint format {ckpt_format!r}", fix=f"use one of {sorted(WRITERS)}")
    pieces = sum(f["tensors"] for f in summary["files"])
    if ckpt_format != "torch":
        summary.pop("files", None)      # per-rank files exist only in the per-rank torch format
    n = plan_workers(summary, workers, launcher, share=share,
                     units=len(layout.rank_files()) if ckpt_format == "torch" else len(plan.items))
    if dry_run:
        return {**summary, **time_forecast("hf_to_megatron", summary, dst, source=source.path, pieces=pieces, workers=n)}
    if fan_out(job, dst, n, sources=[Path(source.path)], overwrite=overwrite, launcher=launcher, share=share):
        return summary
    main_dtype = dtype or plan.items[0].megatron.dtype
    args = build_args(cfg, layout, padded_vocab=padded, divisible_by=divisible_by, dtype=main_dtype,
                      impl=impl, iteration=0 if iteration == "release" else int(iteration),
                      grouped_gemm=moe_grouped_gemm)
    extra = {"hf_config": hf_cfg, "family": family.name, "ckptconv_version": __version__}
    fingerprints = ManifestBuilder.for_hf_config(hf_cfg)
    checks = StreamChecks(fingerprints, path=source.path, allow_nonfinite=allow_nonfinite)
    budget, streams = Budget(memory_budget), []
    with output_dir(Path(dst), sources=[Path(source.path)], overwrite=overwrite, share=share) as tmp, \
            checks_closed(checks):
        with megatron_share_writer(ckpt_format, tmp, layout, plan.target_metas(), args=args, iteration=iteration,
                                   impl=impl, tie_copy=cfg.tie_embeddings, gated_mlp=cfg.gated, extra=extra,
                                   share=share) as writer:
            items = plan.items if share is None else [i for i in plan.items if writer.holds(i.megatron.name)]
            streaming = getattr(writer, "takes_row_streams", False)
            with behind(writer) as out:
                for item in progress(items, desc="to megatron", enabled=show_progress):
                    s = megatron_item_stream(item, source, plan.ctx, budget, fingerprints, path=source.path,
                                             allow_nonfinite=allow_nonfinite) if streaming else None
                    if s is not None:       # rows read under the budget as the writer asks for them
                        out.write(item.megatron.name, s)
                        streams.append(s)
                        continue
                    with budget.io_lock:
                        xs = [source.read(m.name) for m in item.hf]
                    budget.note_whole(item.megatron.name, item.megatron.nbytes + sum(m.nbytes for m in item.hf))
                    for m, x in zip(item.hf, xs):   # fingerprints: what a reader of the output gets back
                        checks.submit(m.name, x, cast=item.megatron.dtype, fingerprint_as=m.name)
                    t = get_op(item.op).forward(xs, plan.ctx)
                    out.write(item.megatron.name, t.to(item.megatron.dtype))
                    del xs, t
                    release_freed_memory()
        for s in streams:
            s.finish_targets()
        checks.finish()
        summary.update(budget.summary())
        if share is None or share.lead:
            assets = tmp / HF_ASSETS_DIR
            assets.mkdir()
            (assets / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
            for f in source.asset_files():
                (assets / f.name).write_bytes(f.read_bytes())
        write_fingerprints(fingerprints, tmp, share)
    return summary


@worker_command
def hf_to_megatron(src: str | Path, dst: str | Path, *, cache_dir: str | Path | None = None,
                   download: bool = False, **kwargs) -> dict:
    """Convert an HF checkpoint (directory, or hf:// repo id: cache, or download if asked) to
    Megatron (see source_to_megatron). A dry-run also takes a config.json alone (or a directory
    holding only one): it plans from the shapes the family's table gives the model."""
    path = resolve_hf_source(str(src), cache_dir, download)
    with open_hf_or_config(path, kwargs.get("dry_run", False)) as source:
        return source_to_megatron(source, dst, **kwargs)


def source_to_hf(source, dst: str | Path, *, dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB",
                 overwrite: bool = False, dry_run: bool = False, allow_nonfinite: bool = False,
                 show_progress: bool = True, summary: dict | None = None, workers: int | str = 1,
                 launcher: str = "local", share: Share | None = None, job: WorkerJob | None = None,
                 memory_budget: int = DEFAULT_BUDGET) -> dict:
    """Write any HF-named source as HF safetensors (+ config and tokenizer/generation files);
    experts packed as transformers 5 holds them are written in the hub's per-expert layout.
    ``workers``, ``launcher``, ``share``, ``job``: as for source_to_megatron (a share is a set of
    safetensors shard files)."""
    if has_packed_experts(source.tensors()):
        family = family_for_hf(source.config(), Path(source.path) / "config.json")
        source = with_hub_experts(source, family, family.from_hf_config(source.config()))
    metas = [TensorMeta(m.name, m.shape, dtype or m.dtype) for m in source.tensors().values()]
    summary = {"source": str(source.path), "destination": str(dst), "format": "hf",
               "tensors_written": len(metas), "bytes_written": sum(m.nbytes for m in metas), **(summary or {})}
    summary.update(memory_forecast(memory_budget, [m.nbytes for m in metas if hf_streams(m, source)],
                                   [m.nbytes for m in metas if not hf_streams(m, source)]))
    n = plan_workers(summary, workers, launcher, share=share, units=len(hf_files(metas, parse_size(max_shard_size))))
    if dry_run:
        return {**summary, **time_forecast("megatron_to_hf", summary, dst, pieces=len(metas), source=source.path,
                                           workers=n)}
    if fan_out(job, dst, n, sources=[Path(source.path)], overwrite=overwrite, launcher=launcher, share=share):
        return summary
    config = source.config()
    if dtype is not None:
        config["dtype"] = dtype_name(dtype)
        config.pop("torch_dtype", None)
    fingerprints = ManifestBuilder.for_hf_config(config)
    checks = StreamChecks(fingerprints, path=source.path, allow_nonfinite=allow_nonfinite)
    budget, streams, src_metas = Budget(memory_budget), [], source.tensors()
    stored = getattr(source, "stored_meta", None)      # the dtype it reads, before a --dtype cast
    background_integrity_check(source, share)
    with output_dir(Path(dst), sources=[Path(source.path)], overwrite=overwrite, share=share) as tmp, \
            checks_closed(checks):
        with hf_share_writer(tmp, metas, parse_size(max_shard_size), share=share) as writer:
            streaming = getattr(writer, "takes_row_streams", False)
            with behind(writer) as out:
                for m in progress(metas if share is None else [m for m in metas if writer.holds(m.name)],
                                  desc="to hf", enabled=show_progress):
                    s = hf_stream(m, stored(m.name) if stored else src_metas[m.name], source, budget,
                                  fingerprints, path=source.path,
                                  allow_nonfinite=allow_nonfinite) if streaming else None
                    if s is not None:       # rows read under the budget as the writer asks for them
                        out.write(m.name, s)
                        streams.append(s)
                        continue
                    with budget.io_lock:
                        t = source.read(m.name)
                    budget.note_whole(m.name, 2 * m.nbytes)
                    checks.submit(m.name, t, cast=m.dtype, fingerprint_as=m.name)
                    out.write(m.name, t.to(m.dtype))
                    del t
                    release_freed_memory()
            for s in streams:
                s.finish_targets()
            checks.finish()
            finish_integrity_check(source)
            summary.update(budget.summary())
            if share is None or share.lead:
                writer.write_config(config)
                writer.copy_assets(source.asset_files())
        write_fingerprints(fingerprints, tmp, share)
    return summary


@worker_command
def megatron_to_hf(src: str | Path, dst: str | Path, *, iteration: str | int = "latest",
                   hf_config: str | Path | None = None, dtype: torch.dtype | None = None, **kwargs) -> dict:
    """Convert a Megatron checkpoint (any TP/PP/VPP) to HF safetensors (see source_to_hf)."""
    reader = open_megatron_reader(Path(src), detect_format(Path(src)), iteration)
    with MegatronAsHF(reader, load_hf_config_arg(hf_config), dtype) as source:
        summary = {"iteration": reader.iteration, **source.plan.summary()}
        return source_to_hf(source, dst, dtype=dtype, summary=summary, **kwargs)
