"""`fingerprint CKPT`: the manifest of any checkpoint (HF, Megatron any TP/PP, ...), computed
from its logical parameters in HF names, one parameter group at a time."""
from __future__ import annotations

from pathlib import Path

from ..errors import UnknownFormat
from .groups import hf_groups, read_group
from .manifest import Manifest, ManifestBuilder
from .sides import open_side


class _Nothing:
    """An empty peer for walking one checkpoint's groups."""
    kind = "manifest"
    layout = None

    def hf_metas(self) -> dict:
        return {}


def fingerprint_checkpoint(path: str | Path, *, iteration: str | int = "latest",
                           hf_config: dict | None = None) -> Manifest:
    side = open_side(path, "checkpoint", iteration=iteration, hf_config=hf_config)
    try:
        if side.kind == "manifest":
            raise UnknownFormat("this is already a manifest, not a checkpoint", path=path,
                                fix="pass a checkpoint directory")
        builder = ManifestBuilder(side.cfg, side.family)
        peer = _Nothing()
        groups, _ = hf_groups(side, peer)
        for g in groups:
            if g.tied:
                continue            # a stored copy of the tied embedding is not a logical parameter
            for name, t in read_group(side, peer, g, "a", "hf").items():
                builder.add(name, t)
        return builder.manifest()
    finally:
        side.close()
