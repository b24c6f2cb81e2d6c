"""`_extra_state` through reshard: Megatron -> Megatron carries each module's extra state (e.g.
Transformer Engine's FP8 scaling state) as opaque bytes where its owner rank is unambiguous.

What a source holds:
* per-rank ``torch``: one object per (TP rank, module); Megatron saves whatever the module's
  ``get_extra_state`` returns (Transformer Engine: a uint8 tensor of its pickled state);
* ``torch_dist``: one object per module (Megatron saves it as a ShardedObject replicated over
  TP: TP rank 0's copy; every TP rank gets it back on load).

What is carried (bytes copied exactly; the object is never interpreted):
* ``torch`` -> ``torch`` at the same TP: each TP rank's object to the same TP rank;
* ``torch_dist`` -> any, and ``torch`` -> any other TP or to ``torch_dist`` when all TP ranks
  hold identical bytes: that object, to every TP rank (as Megatron's own load does);
* only tensors (what Megatron-Core and Transformer Engine store); a module's entry must exist
  in the target key space (``transformer_impl``).
Not carried (reset to None, listed in the summary as ``extra_state_dropped`` with the reason):
TP ranks that disagree when the TP degree or the format changes (no owner rank), objects that
are not tensors (e.g. an old Transformer Engine's BytesIO), modules the target has no entry for.
"""
from __future__ import annotations

from typing import Any

import torch

from ..formats.megatron_names import EXTRA_STATE_MODULES, to_canonical


def _tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    load = getattr(obj, "load", None)        # LazyTensor of the safe unpickler
    return load() if callable(load) and hasattr(obj, "dtype") else None


def _target_keys(plan, ckpt_format: str) -> set[str]:
    """Canonical `_extra_state` keys the target checkpoint has an entry for."""
    impl = "transformer_engine" if ckpt_format == "torch_dist" else plan.impl
    keys = {to_canonical(f"decoder.layers.{i}.{mod}._extra_state")
            for i in range(plan.layout.num_layers) for mod in EXTRA_STATE_MODULES[impl]}
    if ckpt_format == "torch":
        keys.add("output_layer._extra_state")
    return keys


def carried_extra_state(reader, plan, ckpt_format: str) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, str]]:
    """({canonical key: {target TP rank: tensor}}, {key: why not carried}) for the non-None
    `_extra_state` objects of ``reader`` (see the module docstring)."""
    objects = getattr(reader, "extra_state_objects", lambda: {})()
    src_tp, dst_tp = reader.layout.tp, plan.layout.tp
    same_ranks = ckpt_format == "torch" and reader.format == "megatron_torch" and src_tp == dst_tp
    wanted = _target_keys(plan, ckpt_format)
    carried: dict[str, dict[int, torch.Tensor]] = {}
    dropped: dict[str, str] = {}
    for key, per_rank in sorted(objects.items()):
        per_rank = {r: o for r, o in per_rank.items() if o is not None}
        if not per_rank:
            continue
        if key not in wanted:
            dropped[key] = f"the target ({ckpt_format}, {plan.impl}) has no such module entry"
            continue
        tensors = {r: _tensor(o) for r, o in per_rank.items()}
        if any(t is None for t in tensors.values()):
            dropped[key] = f"not a tensor ({type(next(o for o in per_rank.values())).__name__})"
            continue
        if same_ranks:
            carried[key] = {r: t for r, t in tensors.items() if r is not None}
            continue
        values = list(tensors.values())
        if any(not _same_bytes(values[0], v) for v in values[1:]):
            dropped[key] = f"the {src_tp} TP ranks hold different bytes and the target changes the TP degree or format"
            continue
        carried[key] = {r: values[0] for r in range(dst_tp if ckpt_format == "torch" else 1)}
    return carried, dropped


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and \
        bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))

