"""Format sniffing from file names only (no tensor bytes read).

SNIFFERS is an ordered list of (format name, predicate on a directory); the first match wins.
A new format adds one entry here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UnknownFormat
from .dcp_layout import is_dcp
from .deepspeed_common import is_deepspeed
from .megatron_dist_detect import is_dist_checkpoint
from .megatron_torch import LATEST, is_iteration_dir

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def is_hf(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / w).is_file() for w in HF_WEIGHTS)


def is_megatron_torch(p: Path) -> bool:
    return (p / LATEST).is_file() or is_iteration_dir(p) or (p / "release").is_dir() \
        or any(c.name.startswith("iter_") and c.is_dir() for c in p.iterdir())


SNIFFERS: list[tuple[str, Callable[[Path], bool]]] = [
    ("hf", is_hf),
    ("deepspeed", is_deepspeed),    # after hf: an HF Trainer checkpoint-N/ with weights reads as HF
    ("megatron_torch_dist", is_dist_checkpoint),
    ("dcp", is_dcp),                # after torch_dist: Megatron's DCP has a metadata.json marker
    ("megatron_torch", is_megatron_torch),
]


def detect_format(path: Path) -> str:
    """The format name of a checkpoint directory; raises UnknownFormat with what was looked for."""
    p = Path(path)
    if not p.exists():
        raise UnknownFormat("path does not exist", path=p, fix="check the path (or the hub repo id)")
    if p.is_dir():
        for name, sniff in SNIFFERS:
            if sniff(p):
                return name
    raise UnknownFormat("not a recognised checkpoint (looked for config.json + model*.safetensors, or "
                        f"{LATEST} / iter_* / release with mp_rank_* directories, or a DCP .metadata)", path=p,
                        fix="point at the checkpoint's root directory")
