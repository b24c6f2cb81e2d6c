"""The fingerprint manifest of a reshard's output, built while it streams.

A reshard moves values without changing them, but the manifest is computed from what is
written (each logical Megatron tensor taken back to its HF parameters through the family's
inverse op, as any reader of the output would), not copied from the source. With several
workers each writes the fingerprints of its share to a part file (``manifest_parts``).
A checkpoint whose model config ckptconv cannot determine (no HF config, not Llama-like) gets
no manifest, and the summary says why.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CkptError
from ..families import family_by_name
from ..formats.megatron_args import config_from_args
from ..ops import OpContext, get_op
from ..ops.rows import input_runs, row_runs
from .rows import Target
from ..verify.manifest import ManifestBuilder
from .manifest_parts import write_fingerprints


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

    def targets(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list | None:
        """The HF tensors inside logical tensor ``name`` (of ``shape``, as the source holds it) as
        row-stream targets (``engine.rows.Target``): [] when none is fingerprinted, None when the
        op is not row-wise (then ``add`` the whole tensor)."""
        m = self._maps.get(name) if self.builder is not None else None
        if m is None:
            return []
        op = get_op(m.op)
        hf_shapes = op.inverse_shapes(tuple(shape), self._ctx)
        runs = row_runs(m.op, tuple(s[0] for s in hf_shapes), self._ctx) if shape and all(hf_shapes) else None
        if runs is None:
            return None
        return [Target(hf, tuple(s), tuple((0, r.at, r.n) for r in input_runs(runs, k)), check=False, cast=dtype,
                       fingerprint=self.builder.wants(hf)) for k, (hf, s) in enumerate(zip(m.hf, hf_shapes))]

    def write(self, out: Path, share) -> None:
        if self.builder is not None:
            write_fingerprints(self.builder, out, share)
