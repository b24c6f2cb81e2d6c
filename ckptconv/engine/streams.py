"""The row streams of the converting commands: which source rows make each output tensor, and
which HF-logical tensors are checked and fingerprinted on the way (``engine.rows``).

* hf-to-megatron: a Megatron logical tensor from the rows of its HF tensors (the family op's
  ``ops.rows.row_runs``); each HF tensor is checked (NaN/Inf, overflow of the cast) and
  fingerprinted as it is read.
* to-HF (megatron-to-hf, deepspeed-to-hf, dcp-to-hf): each HF tensor from its source's rows
  (``read_rows`` when the source has it: a Megatron source reads them from the fused tensor's
  rows), checked and fingerprinted.
* reshard: each Megatron tensor from the source's same tensor (vocab rows re-padded), the HF
  tensors inside it fingerprinted (``reshard_manifest.ShareFingerprints.targets``).
Ops that are not row-wise (GPT-2's transposed Conv1D weights) have no runs: None, and the
engine takes whole tensors for those.
"""
from __future__ import annotations

from ..ops import get_op
from ..ops.rows import Run, identity_runs, row_runs
from ..types import TensorMeta
from .budget import Budget
from .rows import RowStream, Source, Target


def reads_rows(source) -> bool:
    """Whether ``source`` reads rows for a stream (else a stream's input is read whole)."""
    return bool(getattr(source, "rows_readable", hasattr(source, "read_rows")))


def item_streams(item, source) -> bool:
    """hf-to-megatron: whether ``megatron_item_stream`` streams this plan item by rows."""
    return reads_rows(source) and get_op(item.op).row_wise and all(m.shape for m in (item.megatron, *item.hf))


def hf_streams(out: TensorMeta, source) -> bool:
    """to-HF: whether ``hf_stream`` streams this HF tensor by rows (and its source reads them)."""
    of = getattr(source, "reads_rows_of", None)
    return reads_rows(source) and bool(out.shape) and (of is None or of(out.name))


def source_input(source, meta: TensorMeta) -> Source:
    """A stream input reading ``meta.name`` from ``source`` (by rows when it can)."""
    rows = getattr(source, "read_rows", None) if reads_rows(source) else None
    read = (lambda a, b, out: rows(meta.name, a, b, out)) if rows is not None and meta.shape else None
    return Source(meta, read, lambda: source.read(meta.name))


def reporter(fingerprints):
    """``on_target`` that records a finished target's fingerprint in a ManifestBuilder."""
    def report(t: Target) -> None:
        if t.fingerprint and fingerprints is not None:
            fingerprints.add_digest(t.name, t.shape, t.cast, t.digest)    # read when the manifest is
    return report


def _target(meta: TensorMeta, segments, *, check: bool, cast, fingerprints) -> Target:
    wanted = fingerprints is not None and fingerprints.wants(meta.name)
    return Target(meta.name, tuple(meta.shape), tuple(segments), check=check, cast=cast, fingerprint=wanted)


def megatron_item_stream(item, source, ctx, budget: Budget, fingerprints, *, allow_nonfinite: bool,
                         path=None) -> RowStream | None:
    """hf-to-megatron: the Megatron tensor of a plan item, from its HF tensors' rows."""
    if any(not m.shape for m in item.hf) or not item.megatron.shape:
        return None
    runs = row_runs(item.op, tuple(m.shape[0] for m in item.hf), ctx)
    if runs is None:
        return None
    targets = [_target(m, [(k, 0, m.shape[0])], check=not allow_nonfinite, cast=item.megatron.dtype,
                       fingerprints=fingerprints) for k, m in enumerate(item.hf)]
    return RowStream(item.megatron, [source_input(source, m) for m in item.hf], runs, budget, targets,
                     reporter(fingerprints), path)


def hf_stream(out: TensorMeta, src: TensorMeta, source, budget: Budget, fingerprints, *,
              allow_nonfinite: bool, path=None) -> RowStream | None:
    """to-HF: one HF tensor (``out``: its output dtype) from the source's tensor ``src``."""
    if not out.shape:
        return None
    target = _target(out, [(0, 0, out.shape[0])], check=not allow_nonfinite, cast=out.dtype,
                     fingerprints=fingerprints)
    return RowStream(out, [source_input(source, src)], identity_runs(out.shape[0]), budget, [target],
                     reporter(fingerprints), path)


def reshard_stream(out: TensorMeta, src: TensorMeta, reader, budget: Budget, targets, fingerprints) -> RowStream | None:
    """reshard: Megatron tensor ``out`` from the source's ``src`` (rows beyond the source's are
    zeros, source rows beyond ``out``'s dropped: the vocab re-padding)."""
    if not out.shape or tuple(out.shape[1:]) != tuple(src.shape[1:]):
        return None
    keep = min(out.shape[0], src.shape[0])
    runs = tuple(r for r in (Run(0, 0, 0, keep), Run(keep, -1, 0, out.shape[0] - keep)) if r.n)
    read = lambda a, b, o: reader.read_slice(src.name, 0, a, b, out=o)  # noqa: E731
    return RowStream(out, [Source(src, read, lambda: reader.read(src.name))],
                     runs, budget, targets or [], reporter(fingerprints))
