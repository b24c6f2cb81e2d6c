"""What to run, decided in the launching process from metadata alone (no tensor bytes).

``prepare_run`` detects the format, reads the config and the parallel layout, checks every
tensor's logical shape against the config (so a bad checkpoint fails here, with one clear
error, before any rank starts) and returns a picklable ``RunSpec`` that every rank uses to
open its own shard.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..engine.packed_experts import with_hub_experts
from ..families import family_by_name, family_for_hf
from ..families.schema import ModelConfig
from ..formats.closing import wrap_or_close
from ..formats.detect import detect_format
from ..formats.hf_hub import resolve_hf_source
from ..formats.megatron import READERS as MEGATRON_READERS
from ..formats.megatron import open_megatron_reader
from ..formats.megatron_args import config_from_args
from ..plan.megatron_layout import MegatronLayout, pad_vocab_size
from ..plan.planner import check_divisibility, plan_hf_to_megatron, plan_megatron_to_hf
from ..sources import open_hf_view
from ..types import dtype_name
from .loader import HFAsMegatron, LogicalShards, RankFileShards
from .parallel import stage_size


@dataclass(frozen=True)
class RunSpec:
    path: str
    fmt: str
    iteration: str | int
    cfg: ModelConfig
    layout: MegatronLayout          # the layout the runtime executes with
    padded_vocab: int
    native: bool                    # each rank reads exactly one per-rank file of the checkpoint
    dtype: torch.dtype
    device: str                     # "cpu" | "cuda"
    iter_dir: str | None = None
    hf_config: dict | None = None

    @property
    def world(self) -> int:
        """PP x lcm(TP, ETP x EP) ranks (TP x PP for a dense model); see runtime.parallel."""
        return self.layout.pp * stage_size(self.layout.tp, self.layout.ep, self.layout.etp)

    def open_shards(self, tp_rank: int, pp_rank: int, ep_rank: int = 0):
        """This rank's shard source (see ckptconv.runtime.loader)."""
        if self.native:
            return RankFileShards(Path(self.iter_dir), self.layout, tp_rank, pp_rank, ep_rank)
        if self.fmt in MEGATRON_READERS:
            return LogicalShards(open_megatron_reader(Path(self.path), self.fmt, self.iteration), self.layout, tp_rank,
                                 self.cfg.gated)
        family = family_by_name(self.cfg.family)
        source = open_hf_view(self.path, iteration=self.iteration, hf_config=self.hf_config)
        return wrap_or_close(source, lambda s: LogicalShards(
            HFAsMegatron(with_hub_experts(s, family, self.cfg), self.cfg, self.layout, self.padded_vocab,
                         sliceable=hasattr(s, "read_slice")),
            self.layout, tp_rank, self.cfg.gated))

    def summary(self) -> dict:
        lay = self.layout
        experts = {"num_experts": self.cfg.num_experts, "moe_topk": self.cfg.moe_topk, "ep": lay.ep, "etp": lay.etp} \
            if self.cfg.num_experts else {}
        return {"checkpoint": self.path, "format": self.fmt, "family": self.cfg.family,
                "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, **experts, "ranks": self.world,
                "layers_per_stage": lay.stage_layer_counts(), "vocab_size": self.cfg.vocab_size,
                "padded_vocab_size": self.padded_vocab, "dtype": dtype_name(self.dtype), "device": self.device,
                "reads": self.reads()}

    def reads(self) -> str:
        """What each rank reads from disk."""
        if self.native:
            return "its own rank file"
        if self.fmt == "hf":
            return "its own rows of each tensor (row-parallel weights: whole, keeping its columns)"
        if hasattr(MEGATRON_READERS.get(self.fmt), "read_slice"):
            return "its own slices of each tensor"
        return "whole logical tensors, keeping its slice"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return device


def _override(stored: MegatronLayout, tp, pp, vpp, ep, etp) -> MegatronLayout:
    experts = {k: v for k, v in (("ep", ep), ("etp", etp)) if v is not None}
    if tp is not None and etp is None and tp % stored.etp:
        experts["etp"] = 1                       # a new TP need not be a multiple of the stored ETP
    if pp is None and vpp is None:
        return replace(stored, **({"tp": tp} if tp is not None else {}), **experts)
    return MegatronLayout(tp or stored.tp, pp or stored.pp, stored.num_layers, vpp if vpp and vpp > 1 else None,
                          num_experts=stored.num_experts, ep=experts.get("ep", stored.ep),
                          etp=experts.get("etp", stored.etp))


def prepare_run(path: str | Path, *, tp: int | None = None, pp: int | None = None, vpp: int | None = None,
                ep: int | None = None, etp: int | None = None, iteration: str | int = "latest",
                hf_config: dict | None = None, dtype: torch.dtype = torch.float32, device: str = "auto",
                cache_dir: str | Path | None = None) -> RunSpec:
    """Metadata-only preparation of a run. ``tp``/``pp``/``vpp``/``ep``/``etp`` choose the
    execution layout (default: the checkpoint's own for Megatron, all 1 for HF)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the runtime executes in float32 or bfloat16, not {dtype}")
    root = resolve_hf_source(str(path), cache_dir)
    fmt = detect_format(root)
    if fmt in MEGATRON_READERS:
        with open_megatron_reader(root, fmt, iteration) as reader:
            cfg = config_from_args(reader.args, hf_config or reader.meta.get("hf_config"))
            metas = reader.tensors()
            padded = int(getattr(reader.args, "padded_vocab_size", 0)
                         or metas["embedding.word_embeddings.weight"].shape[0])
            plan_megatron_to_hf(family_by_name(cfg.family), cfg, metas, reader.layout, padded)
            layout = _override(reader.layout, tp, pp, vpp, ep, etp)
            native = fmt == "megatron_torch" and layout == reader.layout
            iter_dir = str(reader.iter_dir)
    else:
        with open_hf_view(root, iteration=iteration, hf_config=hf_config) as source:
            hf = hf_config or source.config()
            cfg = family_for_hf(hf, Path(source.path) / "config.json").from_hf_config(hf)
            layout = MegatronLayout(tp or 1, pp or 1, cfg.num_layers, vpp if vpp and vpp > 1 else None,
                                    num_experts=cfg.num_experts, ep=ep or 1, etp=etp or 1)
            padded = pad_vocab_size(cfg.vocab_size, 1, layout.tp)
            check_divisibility(cfg, layout, padded)
            family = family_by_name(cfg.family)
            plan_hf_to_megatron(family, cfg, with_hub_experts(source, family, cfg).tensors(), layout, padded)
        native, iter_dir = False, None
    check_divisibility(cfg, layout, padded)
    return RunSpec(str(root), fmt, iteration, cfg, layout, padded, native, dtype, resolve_device(device),
                   iter_dir, hf_config)
