"""`inspect` for torch DCP training checkpoints: layout, naming, wrapper, the model's tensors
(HF names), and the training state next to it (optimizer moments, scheduler, RNG, dataloader)
listed by name and size. Pickled items are listed, never unpickled; accelerate's
``random_states_*.pkl`` and ``scheduler.bin`` are listed as files, never opened."""
from __future__ import annotations

import math
from pathlib import Path

from .errors import CkptError
from .families import family_for_hf
from .formats.dcp_layout import TRAINING_STATE
from .formats.dcp_slices import DcpStore
from .formats.dcp_source import DcpSource
from .inspect_summary import tensor_summary


def _optim_dir(path: Path) -> dict:
    store = DcpStore(path)
    try:
        metas = store.tensor_metadata()
        return {"tensors": len(metas), "bytes": sum(m.properties.dtype.itemsize * math.prod(m.size)
                                                     for m in metas.values()),
                "pickled": store.bytes_keys(), "dir": str(path)}
    finally:
        store.close()


def inspect_dcp(path: Path, iteration: str = "latest") -> dict:
    with DcpSource(path, None if iteration in ("latest", "release") else iteration) as source:
        lay = source.layout
        try:
            cfg = source.config()
            family = family_for_hf(cfg).name
        except CkptError:
            cfg, family = None, None
        info = {"path": str(path), "format": "dcp", "family": family, "layout": lay.kind, "step": lay.step,
                "model_dir": str(lay.model_dir), "naming": source.naming, "wrapper": source.keys.wrapper,
                "has_config": cfg is not None, "dropped_aliases": source.dropped_aliases,
                "training_state": source.state_items(),
                **tensor_summary(source.tensors())}
    if lay.optim_dir is not None:
        info["training_state"]["optimizer"] = _optim_dir(lay.optim_dir)
    if lay.model_dir != lay.root:
        info["other_files"] = sorted(c.name for c in lay.root.iterdir() if c.is_file())
    info["other_state"] = sorted(info["training_state"])
    return info


def dcp_text(info: dict) -> list[str]:
    lines = [f"  layout {info['layout']}" + (f" step {info['step']}" if info["step"] is not None else "")
             + f", {info['naming']} names, wrapper {info['wrapper'] or 'none'!r}, model in {info['model_dir']}"]
    for group, s in info["training_state"].items():
        what = f"{s['tensors']} tensors ({s['bytes']:,} bytes)"
        if s.get("pickled"):
            what += f", {len(s['pickled'])} pickled items (not read)"
        lines.append(f"  {group}: {what}" + ("" if group in TRAINING_STATE else " (not model weights)"))
    if info.get("other_files"):
        lines.append(f"  other files (not read): {', '.join(info['other_files'])}")
    return lines
