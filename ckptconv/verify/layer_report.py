"""Layer-offset diagnoses over a finished report (shared by the value walk and the fingerprint
check): which failing layer tensors of B hold A's tensors of another layer or stage."""
from __future__ import annotations

from .diagnose_experts import expert_swaps
from .diagnose_layers import both_ways
from .report import Report


def stage_of(side):
    """Layer index -> pipeline stage of a Megatron side with PP > 1, else None."""
    lay = side.layout
    if lay is None or lay.pp < 2:
        return None
    return lambda i: lay.locate(f"decoder.layers.{i}.x").pp_rank


def layer_diagnoses(report: Report, sa, sb, keys_a: dict, keys_b: dict, explained: set[str] = frozenset()) -> None:
    failing = [r.name for r in report.results if r.status in ("differs", "shape") and r.name not in explained]
    msgs = both_ways(failing, keys_a, keys_b, layers_a=sa.cfg.num_layers, layers_b=sb.cfg.num_layers,
                     stage_a=stage_of(sa), stage_b=stage_of(sb),
                     missing_in_a=[r.name for r in report.results if r.status == "missing_in_a"],
                     missing_in_b=[r.name for r in report.results if r.status == "missing_in_b"])
    msgs = {**expert_swaps([n for n in failing if n not in msgs], keys_a, keys_b), **msgs}
    for r in report.results:
        if r.name in msgs:
            r.diagnosis = msgs[r.name]
