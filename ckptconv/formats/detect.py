"""Format sniffing from file names only (no tensor bytes read)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UnknownFormat
from .megatron_torch import LATEST, is_iteration_dir

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def detect_format(path: Path) -> str:
    """'hf' | 'megatron_torch'; raises UnknownFormat with what was looked for."""
    p = Path(path)
    if not p.exists():
        raise UnknownFormat("path does not exist", path=p, fix="check the path (or the hub repo id)")
    if p.is_dir():
        if (p / "config.json").is_file() and any((p / w).is_file() for w in HF_WEIGHTS):
            return "hf"
        if (p / LATEST).is_file() or is_iteration_dir(p) or (p / "release").is_dir() \
                or any(c.name.startswith("iter_") and c.is_dir() for c in p.iterdir()):
            return "megatron_torch"
    raise UnknownFormat("not a recognised checkpoint (looked for config.json + model*.safetensors, or "
                        f"{LATEST} / iter_* / release with mp_rank_* directories)", path=p,
                        fix="point at the checkpoint's root directory")
