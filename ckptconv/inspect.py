"""`inspect`: what a checkpoint is, from headers and pickles only (no tensor bytes read)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import CkptError
from .families import family_for_hf
from .formats.detect import detect_format
from .formats.hf import HFReader
from .formats.megatron_args import config_from_args
from .formats.megatron import open_megatron_reader
from .inspect_dcp import dcp_text, inspect_dcp
from .inspect_deepspeed import inspect_deepspeed
from .inspect_summary import tensor_summary


def inspect_hf(path: Path, iteration: str = "latest") -> dict:
    with HFReader(path) as r:
        cfg = r.config()
        try:
            family = family_for_hf(cfg).name
        except CkptError:
            family = None
        return {"path": str(path), "format": "hf", "family": family,
                "architectures": cfg.get("architectures"), "assets": [f.name for f in r.asset_files()],
                **tensor_summary(r.tensors())}


def inspect_megatron(path: Path, iteration: str = "latest", fmt: str = "megatron_torch") -> dict:
    with open_megatron_reader(path, fmt, iteration) as r:
        try:
            family = config_from_args(r.args, r.meta.get("hf_config")).family
        except CkptError:
            family = None
        lay = r.layout
        return {
            "path": str(path), "format": fmt, "iteration_dir": str(r.iter_dir),
            "iteration": r.iteration, "checkpoint_version": r.common.get("checkpoint_version"),
            "family": family, "transformer_impl": r.impl,
            "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "layers_per_stage": lay.stage_layer_counts(),
            "padded_vocab_size": getattr(r.args, "padded_vocab_size", None),
            "vocab_size": getattr(r.args, "vocab_size", None),
            "carries_hf_config": bool(r.meta.get("hf_config")),
            "other_state": sorted(k for k in r.common if k not in ("args", "ckptconv") and not k.startswith("model")),
            "extra_state_entries": len(r.extra_state),
            **({"experts": expert_summary(r)} if lay.num_experts else {}),
            **getattr(r, "layout_report", dict)(),     # torch_dist: which megatron-core layout the files have
            **tensor_summary(r.tensors()),
        }


def expert_summary(r) -> dict:
    """Mixture-of-Experts facts of a Megatron checkpoint: from args, and the layers found holding experts."""
    a, lay = r.args, r.layout
    layers = sorted({int(n.split(".")[2]) for n in r.tensors() if ".mlp.router." in n})
    return {"num_experts": lay.num_experts, "router_topk": getattr(a, "moe_router_topk", None),
            "router_pre_softmax": getattr(a, "moe_router_pre_softmax", None),
            "moe_ffn_hidden_size": getattr(a, "moe_ffn_hidden_size", None),
            "shared_expert_size": getattr(a, "moe_shared_expert_intermediate_size", None),
            "shared_expert_gate": getattr(a, "moe_shared_expert_gate", None),
            "ep": lay.ep, "etp": lay.etp, "experts_per_ep_rank": lay.num_experts // lay.ep,
            "expert_layout": getattr(r, "expert_form", None) or "global expert axis", "moe_layers": layers}


# format name -> inspector(path, iteration) -> dict; a new format adds one entry
INSPECTORS: dict[str, Callable[..., dict]] = {
    "hf": inspect_hf,
    "megatron_torch": inspect_megatron,
    "deepspeed": inspect_deepspeed,
    "megatron_torch_dist": lambda p, it: inspect_megatron(p, it, "megatron_torch_dist"),
    "dcp": inspect_dcp,
}


def inspect_checkpoint(path: str | Path, iteration: str = "latest") -> dict:
    path = Path(path)
    return INSPECTORS[detect_format(path)](path, iteration)


def inspect_text(info: dict, show_tensors: bool = False) -> str:
    lines = [f"{info['path']}: {info['format']}  family={info['family']}"]
    if info["format"].startswith("megatron"):
        lines.append(f"  iteration {info['iteration']}  TP={info['tp']} PP={info['pp']} VPP={info['vpp']} "
                     f"layers/stage {info['layers_per_stage']}  impl={info['transformer_impl']}")
        lines.append(f"  vocab {info['vocab_size']} padded {info['padded_vocab_size']}; "
                     f"other state: {', '.join(info['other_state']) or 'none'}")
        if "experts" in info:
            e = info["experts"]
            lines.append(f"  experts: E={e['num_experts']} top-{e['router_topk']} ffn {e['moe_ffn_hidden_size']} "
                         f"shared={e['shared_expert_size'] or 'none'}{' (gated)' if e['shared_expert_gate'] else ''}  "
                         f"EP={e['ep']} ETP={e['etp']} ({e['experts_per_ep_rank']} per EP rank, "
                         f"{e['expert_layout']})  MoE layers {len(e['moe_layers'])}/{sum(info['layers_per_stage'])}")
    if info["format"] == "dcp":
        lines += dcp_text(info)
    if "dist_layout" in info:
        lines.append(f"  layout: {info['dist_layout']} (loads in megatron-core {info['loads_in']}); common state in "
                     f"{info['common_state']}; integrity manifest: {info['integrity_manifest'] or 'none'}; "
                     f"_extra_state items: {'present' if info['extra_state'] else 'absent'}")
    lines.append(f"  {info['num_tensors']} tensors, {info['num_parameters']:,} parameters, "
                 f"{info['bytes']:,} bytes, dtypes {info['dtypes']}")
    if show_tensors:
        lines += [f"  {n}  {t['shape']}  {t['dtype']}" for n, t in info["tensors"].items()]
    return "\n".join(lines)
