"""The fingerprint manifest of output written by several workers.

Each worker fingerprints what it writes (a ``verify.manifest.ManifestBuilder``) and leaves a
hidden part file in the output; the coordinating process merges the parts into
``ckptconv-manifest.json`` once every share is written. A single process writes the manifest
directly.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..families import family_by_name
from ..verify.manifest import MANIFEST_NAME, Manifest, ManifestBuilder, logical_names

PART = ".ckptconv-manifest.part-{rank}.json"


def write_fingerprints(builder: ManifestBuilder, out: Path, share) -> None:
    """The manifest (one process) or this worker's part of it (``share``: an engine.workers.Share)."""
    if share is None or share.world == 1:
        builder.write(out)
    else:
        (Path(out) / PART.format(rank=share.rank)).write_text(builder.manifest().dumps())


def merge_parts(out: Path, world: int) -> Path | None:
    """Join the workers' part files into the output's manifest (removing the parts); None when
    there are none (no manifest for this model)."""
    parts = [Path(out) / PART.format(rank=r) for r in range(world)]
    if not all(p.is_file() for p in parts):
        for p in parts:
            p.unlink(missing_ok=True)
        return None
    docs = [json.loads(p.read_text()) for p in parts]
    tensors: dict[str, dict] = {}
    for d in docs:
        differ = [n for n, e in d["tensors"].items() if n in tensors and tensors[n] != e]
        if differ:      # several workers may read one tensor (TP pieces in different files): same values
            raise RuntimeError(f"workers fingerprinted {differ[:3]} with different values")
        tensors.update(d["tensors"])
    manifest = Manifest(docs[0]["model"], dict(sorted(tensors.items())))
    expected = set(logical_names(manifest.config(), family_by_name(manifest.model["family"])))
    if not set(tensors) <= expected:
        raise RuntimeError(f"workers fingerprinted {sorted(set(tensors) - expected)[:3]}, not parameters")
    path = manifest.write(Path(out) / MANIFEST_NAME)
    for p in parts:
        p.unlink()
    return path
