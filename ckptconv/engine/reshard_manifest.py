"""The fingerprint manifest of a reshard's output, built while it streams.

A reshard moves values without changing them, but the manifest is computed from what is
written (each logical Megatron tensor taken back to its HF parameters through the family's
inverse op, as any reader of the output would), not copied from the source. With several
workers each writes the fingerprints of its share to a hidden part file; the coordinating
process merges the parts into ``ckptconv-manifest.json`` once every share is written.
A checkpoint whose model config ckptconv cannot determine (no HF config, not Llama-like) gets
no manifest, and the summary says why.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CkptError
from ..families import family_by_name
from ..formats.megatron_args import config_from_args
from ..ops import OpContext, get_op
from ..verify.manifest import MANIFEST_NAME, Manifest, ManifestBuilder, logical_names

PART = ".ckptconv-manifest.part-{rank}.json"


class ShareFingerprints:
    """Fingerprints of the logical tensors one worker writes (``builder`` None: no manifest)."""

    def __init__(self, reader, padded_vocab: int):
        try:
            self.cfg = config_from_args(reader.args, reader.meta.get("hf_config"))
        except CkptError as e:
            self.builder, self.reason = None, e.what
            return
        family = family_by_name(self.cfg.family)
        self.builder, self.reason = ManifestBuilder(self.cfg, family), None
        self._maps = {m.megatron: m for m in family.expand(self.cfg)}
        self._ctx = OpContext(self.cfg, padded_vocab)

    def add(self, name: str, t: torch.Tensor) -> None:
        """``t``: the full logical tensor ``name`` as the source holds it (source vocab padding)."""
        m = self._maps.get(name) if self.builder is not None else None
        if m is None:
            return
        for hf, x in zip(m.hf, get_op(m.op).inverse(t, self._ctx)):
            self.builder.add(hf, x)

    def write(self, out: Path, rank: int, world: int) -> None:
        if self.builder is None:
            return
        if world == 1:
            self.builder.write(out)
        else:
            (Path(out) / PART.format(rank=rank)).write_text(self.builder.manifest().dumps())


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
        tensors.update(d["tensors"])
    manifest = Manifest(docs[0]["model"], dict(sorted(tensors.items())))
    expected = set(logical_names(manifest.config(), family_by_name(manifest.model["family"])))
    if set(tensors) != expected:
        raise RuntimeError(f"reshard workers fingerprinted {len(tensors)} of {len(expected)} parameters")
    path = manifest.write(Path(out) / MANIFEST_NAME)
    for p in parts:
        p.unlink()
    return path
