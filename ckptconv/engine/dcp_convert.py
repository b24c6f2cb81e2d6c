"""torch DCP training checkpoints (FSDP2, accelerate, torchtitan) to HF / Megatron, and HF to DCP.

DCP is one more HF-named source (formats.dcp_source), so the generic engines do the work:
``source_to_hf`` / ``source_to_megatron``. ``hf_to_dcp`` writes any HF-named source (HF,
Megatron, DeepSpeed, DCP) as the model-only DCP checkpoint an FSDP2 job loads with
``dcp.load`` + ``set_model_state_dict`` (HF names, optionally under a state-dict key such as
``model``), or torchtitan loads (its Llama 3 names, RoPE order undone, tied head stored).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UnsupportedFamily
from ..formats import torchtitan_names as tt
from ..formats.dcp_source import TIED, DcpSource
from ..sources import open_hf_view
from ..types import TensorMeta
from .checks import check_finite
from .convert import load_hf_config_arg, source_to_hf, source_to_megatron
from .memory import release_freed_memory
from .progress import progress
from .share_writers import dcp_share_writer
from .workers import Share, WorkerJob, fan_out, output_dir, plan_workers, worker_command

NAMINGS = ("hf", "torchtitan")
EMBED = "model.embed_tokens.weight"


@worker_command
def dcp_to_hf(src: str | Path, dst: str | Path, *, step: str | int | None = None, hf_config: str | Path | None = None,
              dtype: torch.dtype | None = None, **kwargs) -> dict:
    """A DCP checkpoint's model as HF safetensors (see source_to_hf for kwargs)."""
    with DcpSource(src, step, hf_config=hf_config) as source:
        return source_to_hf(source, dst, dtype=dtype, summary=source.summary(), **kwargs)


@worker_command
def dcp_to_megatron(src: str | Path, dst: str | Path, *, step: str | int | None = None,
                    hf_config: str | Path | None = None, **kwargs) -> dict:
    """A DCP checkpoint's model as a Megatron-Core checkpoint (see source_to_megatron)."""
    with DcpSource(src, step, hf_config=hf_config) as source:
        return {**source.summary(), **source_to_megatron(source, dst, **kwargs)}


def dcp_names(metas: dict[str, TensorMeta], cfg: dict, naming: str, key: str | None) -> list[tuple[str, str, str | None]]:
    """(stored key, HF name it is read from, op) for every tensor of the output."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}")
    names = list(metas)
    if cfg.get("tie_word_embeddings") and TIED not in metas and EMBED in metas:
        names.append(TIED)      # FSDP2's state dict and torchtitan's from_hf both carry the tied head
    out = []
    for n in names:
        source_name = EMBED if n == TIED and TIED not in metas else n
        stored, op = (n, None) if naming == "hf" else (tt.from_hf_name(n) or (None, None))
        if stored is None:
            raise UnsupportedFamily("no torchtitan name for this parameter (torchtitan's Llama 3 table)",
                                    tensor=n, fix="use --naming hf")
        out.append((f"{key}.{stored}" if key else stored, source_name, op))
    return out


@worker_command
def hf_to_dcp(src: str | Path, dst: str | Path, *, naming: str = "hf", state_dict_key: str | None = None,
              dtype: torch.dtype | None = None, iteration: str | int = "latest", hf_config: str | Path | None = None,
              cache_dir: str | Path | None = None, overwrite: bool = False, dry_run: bool = False,
              allow_nonfinite: bool = False, show_progress: bool = True, workers: int | str = 1,
              launcher: str = "local", share: Share | None = None, job: WorkerJob | None = None) -> dict:
    """Write an HF-named source as a model-only DCP checkpoint (``workers``, ``launcher``,
    ``share``, ``job``: see source_to_megatron; a share is a set of stored keys)."""
    with open_hf_view(src, iteration=iteration, hf_config=load_hf_config_arg(hf_config), cache_dir=cache_dir) as source:
        cfg = source.config()
        metas = source.tensors()
        plan = dcp_names(metas, cfg, naming, state_dict_key)
        out = [TensorMeta(k, metas[n].shape, dtype or metas[n].dtype) for k, n, _ in plan]
        summary = {"source": str(source.path), "destination": str(dst), "format": "dcp", "naming": naming,
                   "state_dict_key": state_dict_key, "tensors_written": len(out),
                   "bytes_written": sum(m.nbytes for m in out)}
        n = plan_workers(summary, workers, launcher, share=share, units=len(out))
        if dry_run or fan_out(job, dst, n, sources=[Path(source.path)], overwrite=overwrite, launcher=launcher,
                              share=share):
            return summary
        if dtype is not None:
            cfg["dtype"] = str(dtype).replace("torch.", "")
            cfg.pop("torch_dtype", None)
        with output_dir(Path(dst), sources=[Path(source.path)], overwrite=overwrite, share=share) as tmp:
            with dcp_share_writer(tmp, out, share=share) as writer:
                todo = [(p, m) for p, m in zip(plan, out) if share is None or writer.holds(m.name)]
                for (key, name, op), meta in progress(todo, desc="to dcp", enabled=show_progress):
                    t = source.read(name)
                    check_finite(name, t, source.path, allow_nonfinite)
                    writer.write(key, tt.apply(op, t, cfg, to_hf=False).to(meta.dtype))
                    del t
                    release_freed_memory()
            if share is None or share.lead:
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
                for f in source.asset_files():
                    (tmp / f.name).write_bytes(f.read_bytes())
        return summary
