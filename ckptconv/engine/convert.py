"""Execute conversion plans tensor by tensor: HF <-> Megatron per-rank torch format.

At most one logical tensor (its sources, its transformed form and one rank slice) is in
memory at a time; readers mmap/slice and writers stream.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..families import family_by_name, family_for_hf
from ..formats.atomic import atomic_output_dir
from ..formats.hf import HFReader, HFWriter
from ..formats.hf_hub import resolve_hf_source
from ..formats.megatron_args import build_args, config_from_args
from ..formats.megatron_torch import MegatronTorchReader, MegatronTorchWriter
from ..ops import get_op
from ..plan.megatron_layout import MegatronLayout, pad_vocab_size
from ..plan.output_shards import parse_size
from ..plan.planner import plan_hf_to_megatron, plan_megatron_to_hf
from .checks import check_finite
from .progress import progress

HF_ASSETS_DIR = "hf_assets"     # inside a Megatron checkpoint root: the source HF config + tokenizer files


def hf_to_megatron(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                   impl: str = "transformer_engine", dtype: torch.dtype | None = None,
                   divisible_by: int = 128, iteration: int | str = "release", overwrite: bool = False,
                   dry_run: bool = False, allow_nonfinite: bool = False, show_progress: bool = True,
                   cache_dir: str | Path | None = None, first_stage_layers: int | None = None,
                   last_stage_layers: int | None = None) -> dict:
    """Convert an HF checkpoint (directory or cached hub id) to Megatron per-rank torch format."""
    path = resolve_hf_source(str(src), cache_dir)
    with HFReader(path) as reader:
        hf_cfg = reader.config()
        family = family_for_hf(hf_cfg, path / "config.json")
        cfg = family.from_hf_config(hf_cfg)
        layout = MegatronLayout(tp, pp, cfg.num_layers, vpp, first_stage_layers, last_stage_layers)
        padded = pad_vocab_size(cfg.vocab_size, divisible_by, tp)
        plan = plan_hf_to_megatron(family, cfg, reader.tensors(), layout, padded, dtype)
        summary = {"source": str(path), "destination": str(dst), "format": "megatron_torch", **plan.summary()}
        if dry_run:
            return summary
        main_dtype = dtype or plan.items[0].megatron.dtype
        args = build_args(cfg, layout, padded_vocab=padded, divisible_by=divisible_by, dtype=main_dtype,
                          impl=impl, iteration=0 if iteration == "release" else int(iteration))
        extra = {"hf_config": hf_cfg, "family": family.name, "ckptconv_version": __version__}
        with atomic_output_dir(Path(dst), sources=[path], overwrite=overwrite) as tmp:
            with MegatronTorchWriter(tmp, layout, plan.target_metas(), args=args, iteration=iteration,
                                     impl=impl, tie_copy=cfg.tie_embeddings, extra=extra) as writer:
                for item in progress(plan.items, desc="hf-to-megatron", enabled=show_progress):
                    xs = [reader.read(m.name) for m in item.hf]
                    for m, x in zip(item.hf, xs):
                        check_finite(m.name, x, path, allow_nonfinite)
                    t = get_op(item.op).forward(xs, plan.ctx)
                    writer.write(item.megatron.name, t.to(item.megatron.dtype))
                    del xs, t
            assets = tmp / HF_ASSETS_DIR
            assets.mkdir()
            (assets / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
            for f in reader.asset_files():
                (assets / f.name).write_bytes(f.read_bytes())
    return summary


def load_hf_config_arg(hf_config: str | Path | None) -> dict | None:
    if hf_config is None:
        return None
    p = Path(hf_config)
    return json.loads((p / "config.json" if p.is_dir() else p).read_text())


def megatron_to_hf(src: str | Path, dst: str | Path, *, iteration: str | int = "latest",
                   hf_config: str | Path | None = None, dtype: torch.dtype | None = None,
                   max_shard_size: str | int = "5GB", overwrite: bool = False, dry_run: bool = False,
                   allow_nonfinite: bool = False, show_progress: bool = True) -> dict:
    """Convert a Megatron per-rank torch checkpoint (any TP/PP/VPP) to HF safetensors."""
    src = Path(src)
    with MegatronTorchReader(src, iteration) as reader:
        carried = reader.meta.get("hf_config")
        hf_cfg = load_hf_config_arg(hf_config) or carried
        cfg = config_from_args(reader.args, hf_cfg)
        family = family_by_name(cfg.family)
        out_cfg = dict(hf_cfg) if hf_cfg else family.to_hf_config(cfg)
        padded = int(getattr(reader.args, "padded_vocab_size", 0) or
                     reader.tensors()["embedding.word_embeddings.weight"].shape[0])
        plan = plan_megatron_to_hf(family, cfg, reader.tensors(), reader.layout, padded, dtype)
        summary = {"source": str(src), "destination": str(dst), "format": "hf",
                   "iteration": reader.iteration, **plan.summary()}
        if dry_run:
            return summary
        if dtype is not None:
            out_cfg["dtype"] = str(dtype).replace("torch.", "")
            out_cfg.pop("torch_dtype", None)
        assets_dir = reader.root / HF_ASSETS_DIR
        assets = [f for f in sorted(assets_dir.iterdir()) if f.name != "config.json"] if assets_dir.is_dir() else []
        with atomic_output_dir(Path(dst), sources=[src], overwrite=overwrite) as tmp:
            with HFWriter(tmp, plan.target_metas(), parse_size(max_shard_size)) as writer:
                for item in progress(plan.items, desc="megatron-to-hf", enabled=show_progress):
                    t = reader.read(item.megatron.name)
                    check_finite(item.megatron.name, t, reader.iter_dir, allow_nonfinite)
                    for m, x in zip(item.hf, get_op(item.op).inverse(t, plan.ctx)):
                        writer.write(m.name, x.to(m.dtype))
                    del t
                writer.write_config(out_cfg)
                writer.copy_assets(assets)
    return summary
