"""Recognising a Megatron-Core distributed checkpoint (`torch_dist`) from file names and its
metadata.json alone. Kept apart from the reader so that format detection does not import
torch.distributed.checkpoint (~1.5 s) for checkpoints of other formats."""
from __future__ import annotations

import json
from pathlib import Path

from .megatron_torch import LATEST, iteration_dir_name

METADATA_JSON = "metadata.json"


def dist_backend(path: Path) -> str | None:
    """The `sharded_backend` named by ``path``/metadata.json, or None if there is none."""
    f = Path(path) / METADATA_JSON
    if not f.is_file():
        return None
    try:
        backend = json.loads(f.read_text()).get("sharded_backend")
    except (ValueError, OSError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def is_dist_checkpoint(path: Path) -> bool:
    """A distributed-checkpoint iteration directory, or a root whose tracker / iter_* / release
    directory is one (checked from file names and metadata.json only)."""
    p = Path(path)
    if dist_backend(p):
        return True
    marker = p / LATEST
    if marker.is_file():
        name = marker.read_text().strip()
        if name == "release" or name.isdigit():
            target = p / iteration_dir_name(name if name == "release" else int(name))
            if target.is_dir():
                return dist_backend(target) is not None
    return any(dist_backend(c) for c in p.iterdir() if c.is_dir() and (c.name == "release" or c.name.startswith("iter_")))
