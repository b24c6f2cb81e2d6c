"""`inspect` for DeepSpeed checkpoints: tags, stage, world size, dtype, optimizer, groups, files,
and the tensors inside, from pickles only (no tensor bytes read)."""
from __future__ import annotations

from pathlib import Path

from .errors import CkptError, MissingTensors
from .families import family_for_hf
from .formats.deepspeed_common import (LATEST, find_hf_config, is_megatron_deepspeed, list_tags, placeholder_state,
                                       resolve_tag_dir)
from .formats.deepspeed_pipe import MegatronDeepSpeedReader
from .formats.deepspeed_zero import DeepSpeedZeroSource, ZeroOptimFiles
from .formats.megatron_args import config_from_args
from .formats.safe_pickle import LazyTensor
from .inspect_summary import tensor_summary


def _dtype(ds_config: dict) -> str:
    if (ds_config.get("bf16") or {}).get("enabled"):
        return "bf16"
    return "fp16" if (ds_config.get("fp16") or {}).get("enabled") else "fp32"


def _param_groups(optim: ZeroOptimFiles) -> list[dict]:
    osd = optim._osd(optim.files[0])
    inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") or {}
    keep = ("lr", "weight_decay", "betas", "eps")
    return [{k: g[k] for k in keep if k in g} for g in inner.get("param_groups") or []]


def _optimizer_info(optim: ZeroOptimFiles) -> dict:
    if not optim.present:
        return {"optimizer": None, "world_size": None}
    osd = optim._osd(optim.files[0])
    return {"optimizer": optim.optimizer, "world_size": optim.world, "param_groups": _param_groups(optim),
            "flat_groups_rank0": [t.shape[0] for t in optim.flat[0]],
            "loss_scaler": placeholder_state(osd.get("loss_scaler")) or None}


def inspect_deepspeed(path: Path, iteration: str = "latest") -> dict:

    root, tag_dir, tag = resolve_tag_dir(Path(path), None if iteration == "latest" else iteration)
    cfg, cfg_dir = find_hf_config(root, tag_dir, None)
    try:
        family = family_for_hf(cfg).name if cfg else None
    except CkptError:
        family = None
    marker = root / LATEST
    info = {"path": str(path), "format": "deepspeed", "family": family, "tag": tag, "tags": list_tags(root),
            "latest": marker.read_text().strip() if marker.is_file() else None,
            "hf_config": str(cfg_dir / "config.json") if cfg_dir else None,
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in sorted(tag_dir.iterdir()) if f.is_file()]}
    if is_megatron_deepspeed(tag_dir):
        with MegatronDeepSpeedReader(root, tag, weights="module") as r:
            if info["family"] is None and r.args is not None:
                try:
                    info["family"] = config_from_args(r.args).family
                except CkptError:
                    pass
            head = r._states.get(0, {})
            ds = head.get("ds_config") or {}
            optim = ZeroOptimFiles(tag_dir, 0, _dtype(ds) == "bf16")
            try:
                info.update(layout="megatron_deepspeed " + ("pipeline" if r.pipeline else "GPTModel"),
                            tp=r.layout.tp, pp=r.layout.pp, layers_per_stage=r.layout.stage_layer_counts(),
                            dtype=_dtype(ds), ds_version=head.get("ds_version"),
                            global_steps=head.get("global_steps"), checkpoint_version=r.checkpoint_version,
                            padded_vocab_size=getattr(r.args, "padded_vocab_size", None),
                            has_master_weights=optim.present, **_optimizer_info(optim),
                            **tensor_summary(r.tensors()))
            finally:
                optim.close()
        return info
    try:
        source = DeepSpeedZeroSource(root, tag, weights="master", hf_config=cfg)
    except MissingTensors:
        source = DeepSpeedZeroSource(root, tag, weights="module", hf_config=cfg)
    with source:
        head, ds = source.head, source.ds_config
        frozen = head.get("frozen_param_shapes") or {}
        info.update(layout="zero", stage=source.stage, dtype=_dtype(ds), ds_version=head.get("ds_version"),
                    global_steps=head.get("global_steps"), weights=source.weights,
                    has_master_weights=source.weights == "master",
                    has_module_weights=any(isinstance(v, LazyTensor) and v.numel > 0
                                           for v in (head.get("module") or {}).values()),
                    param_shapes_groups=[len(g) for g in head.get("param_shapes") or []],
                    frozen_params=list(frozen), shared_params=dict(source.shared),
                    buffers=list(head.get("buffer_names") or []))
        optim = source.optim or ZeroOptimFiles(tag_dir, 0, _dtype(ds) == "bf16")
        try:
            info.update(_optimizer_info(optim))
        finally:
            if source.optim is None:
                optim.close()
        info.update(tensor_summary(source.tensors()))
    return info

