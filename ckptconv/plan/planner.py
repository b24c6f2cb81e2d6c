"""Plans from metadata alone: which tensors are read, transformed and written, with checks.

A plan is plain data. It is printed by --dry-run, checked before any byte is read (every
source tensor consumed exactly once, every target produced once, shapes agree with the ops,
divisibility by TP/PP/VPP) and executed item by item by the engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import LayoutError, MissingTensors
from ..families.schema import Family, ModelConfig
from ..ops import OpContext, get_op
from ..types import TensorMeta, dtype_name
from .megatron_layout import MegatronLayout, tp_kind

# Megatron logical tensors that carry no information for an HF conversion.
TIED_COPY = "output_layer.weight"


@dataclass(frozen=True)
class PlanItem:
    megatron: TensorMeta
    hf: tuple[TensorMeta, ...]
    op: str


@dataclass
class Plan:
    direction: str                      # "hf_to_megatron" | "megatron_to_hf"
    cfg: ModelConfig
    layout: MegatronLayout
    padded_vocab: int
    items: list[PlanItem]
    ignored: list[str] = field(default_factory=list)

    @property
    def ctx(self) -> OpContext:
        return OpContext(self.cfg, self.padded_vocab)

    def target_metas(self) -> list[TensorMeta]:
        if self.direction == "hf_to_megatron":
            return [it.megatron for it in self.items]
        return [m for it in self.items for m in it.hf]

    def largest_tensor_bytes(self) -> int:
        return max(m.nbytes for it in self.items for m in (it.megatron, *it.hf))

    def summary(self) -> dict:
        metas = self.target_metas()
        src = [m for it in self.items for m in (it.hf if self.direction == "hf_to_megatron" else (it.megatron,))]
        lay = self.layout
        out = {
            "direction": self.direction, "family": self.cfg.family,
            "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "num_layers": self.cfg.num_layers,
            "layers_per_stage": lay.stage_layer_counts(),
            "vocab_size": self.cfg.vocab_size, "padded_vocab_size": self.padded_vocab,
            "tensors_read": len(src), "bytes_read": sum(m.nbytes for m in src),
            "tensors_written": len(metas), "bytes_written": sum(m.nbytes for m in metas),
            "largest_tensor_bytes": self.largest_tensor_bytes(),
            # sources + transformed tensor + a rank slice + allocator slack: bench/ measured 3.7x
            "memory_forecast_bytes": 4 * self.largest_tensor_bytes(),
            "ignored_source_tensors": self.ignored,
            "checks": self.checks(),
        }
        if self.direction == "hf_to_megatron":
            out["files"] = self.rank_files()
        return out

    def checks(self) -> list[str]:
        c, lay = self.cfg, self.layout
        return [
            f"num_query_groups {c.num_kv_heads} % TP {lay.tp} == 0",
            f"num_attention_heads {c.num_heads} % TP {lay.tp} == 0",
            f"ffn_hidden_size {c.ffn_hidden_size} % TP {lay.tp} == 0",
            f"padded vocab {self.padded_vocab} % TP {lay.tp} == 0",
            f"layers {c.num_layers} split over PP {lay.pp} x VPP {lay.vpp or 1} as {lay.stage_layer_counts()}",
        ]

    def rank_files(self) -> list[dict]:
        """Per output rank file: tensor count and bytes (for --dry-run)."""
        lay = self.layout
        files: dict[tuple[int, int, int], dict] = {}
        for it in self.items:
            m = it.megatron
            loc = lay.locate(m.name)
            lshape = lay.local_shape(m.name, tp_kind(m.name, self.cfg.gated), m.shape)
            nbytes = TensorMeta(m.name, lshape, m.dtype).nbytes
            for t, p, e in lay.holders(loc):
                f = files.setdefault((t, p, e), {"tp_rank": t, "pp_rank": p, "tensors": 0, "bytes": 0})
                if lay.ep > 1:
                    f["ep_rank"] = e
                f["tensors"] += 1
                f["bytes"] += nbytes
        return [files[k] for k in sorted(files)]


def check_divisibility(cfg: ModelConfig, layout: MegatronLayout, padded_vocab: int) -> None:
    layout.check()
    tp = layout.tp
    for what, n in (("num_query_groups (num_key_value_heads)", cfg.num_kv_heads),
                    ("num_attention_heads", cfg.num_heads), ("ffn_hidden_size", cfg.ffn_hidden_size),
                    ("padded vocab", padded_vocab)):
        if n % tp:
            raise LayoutError(f"{what}={n} is not divisible by TP={tp}", path="config.json",
                              fix=f"choose a TP that divides {n}")
    for what, n, split, by in (("expert ffn (moe_intermediate_size)", cfg.moe_ffn_hidden_size, layout.etp, "ETP"),
                               ("shared expert ffn", cfg.shared_expert_size, tp, "TP")):
        if cfg.num_experts and n and n % split:
            raise LayoutError(f"{what}={n} is not divisible by {by}={split}", path="config.json",
                              fix=f"choose an {by} that divides {n}")
    if cfg.num_experts and cfg.num_experts != layout.num_experts:
        raise LayoutError(f"the layout has {layout.num_experts} experts, the config {cfg.num_experts}",
                          path="config.json", fix="this is a bug in the caller")
    if cfg.num_heads % cfg.num_kv_heads:
        raise LayoutError(f"num_attention_heads={cfg.num_heads} is not a multiple of num_key_value_heads="
                          f"{cfg.num_kv_heads}", path="config.json", fix="check the model config")


def plan_hf_to_megatron(family: Family, cfg: ModelConfig, source: dict[str, TensorMeta],
                        layout: MegatronLayout, padded_vocab: int,
                        dtype: torch.dtype | None = None) -> Plan:
    check_divisibility(cfg, layout, padded_vocab)
    ctx = OpContext(cfg, padded_vocab)
    items, used = [], set()
    for mp in family.expand(cfg):
        missing = [n for n in mp.hf if n not in source]
        if missing:
            raise MissingTensors(f"{len(missing)} tensor(s) the {family.name} table needs are absent",
                                 tensor=missing[0], fix="check that the checkpoint matches config.json")
        hf = tuple(source[n] for n in mp.hf)
        shape = get_op(mp.op).forward_shape([m.shape for m in hf], ctx)
        _check_inverse(mp.op, shape, hf, ctx)
        out_dtype = dtype or hf[0].dtype
        items.append(PlanItem(TensorMeta(mp.megatron, tuple(shape), out_dtype), hf, mp.op))
        used.update(mp.hf)
    ignored = []
    for name in sorted(set(source) - used):
        if name == "lm_head.weight" and cfg.tie_embeddings:
            ignored.append(name)        # a stored copy of the tied embedding
        elif any(re.search(p, name) for p in family.ignore_hf):
            ignored.append(name)        # a derived buffer some exporters keep (family.ignore_hf)
        else:
            raise MissingTensors(f"unexpected tensor not covered by the {family.name} table", tensor=name,
                                 fix="the checkpoint holds weights this family does not know; check the architecture")
    return Plan("hf_to_megatron", cfg, layout, padded_vocab, items, ignored)


def plan_megatron_to_hf(family: Family, cfg: ModelConfig, source: dict[str, TensorMeta],
                        layout: MegatronLayout, padded_vocab: int,
                        dtype: torch.dtype | None = None) -> Plan:
    ctx = OpContext(cfg, padded_vocab)
    items, used = [], set()
    for mp in family.expand(cfg):
        if mp.megatron not in source:
            raise MissingTensors(f"Megatron tensor needed for {mp.hf[0]} is absent", tensor=mp.megatron,
                                 fix="the checkpoint does not match the model config (pass --hf-config?)")
        meta = source[mp.megatron]
        shapes = get_op(mp.op).inverse_shapes(meta.shape, ctx)
        out_dtype = dtype or meta.dtype
        hf = tuple(TensorMeta(n, tuple(s), out_dtype) for n, s in zip(mp.hf, shapes))
        if tuple(get_op(mp.op).forward_shape([m.shape for m in hf], ctx)) != meta.shape:
            raise LayoutError(f"shape {meta.shape} does not fit the config (expected "
                              f"{get_op(mp.op).forward_shape([m.shape for m in hf], ctx)})",
                              tensor=mp.megatron, fix="pass the matching --hf-config")
        items.append(PlanItem(meta, hf, mp.op))
        used.add(mp.megatron)
    ignored = []
    for name in sorted(set(source) - used):
        if name == TIED_COPY and cfg.tie_embeddings:
            ignored.append(name)        # last-stage copy of the tied embedding (PP > 1)
        else:
            raise MissingTensors(f"unexpected Megatron tensor not covered by the {family.name} table",
                                 tensor=name, fix="this module is not supported for HF export")
    return Plan("megatron_to_hf", cfg, layout, padded_vocab, items, ignored)


def _check_inverse(op: str, shape, hf: tuple[TensorMeta, ...], ctx: OpContext) -> None:
    back = get_op(op).inverse_shapes(shape, ctx)
    for m, s in zip(hf, back):
        if tuple(s) != m.shape:
            raise LayoutError(f"shape {m.shape} does not match the config (expected {tuple(s)}; "
                              f"dtype {dtype_name(m.dtype)})", tensor=m.name,
                              fix="check hidden_size / heads / num_key_value_heads / head_dim in config.json")
