"""Per-tensor checks applied while streaming, fused with the manifest's hashing.

``check_finite`` refuses NaN/Inf (and a cast that overflows) in one tensor, at once.
``StreamChecks`` runs that check and the fingerprint SHA-256 on one worker thread, in one pass
over each tensor's bytes, piece by piece while the piece is hot in cache (aminmax and hashlib
release the GIL, so this overlaps the reads and writes of the engine). Its errors surface at
the next ``submit`` or at ``finish()``, which the engine calls before the output is committed: a
bad tensor still fails the conversion with nothing kept.
"""
from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from ..errors import NonFiniteWeights
from ..types import dtype_name

_FIX = "fix the source weights, or pass --allow-nonfinite to convert anyway"
_PIECE = 4 << 20          # bytes scanned and hashed at a time (stays in cache between the two)
_QUEUE = 2                # tensors submitted but not yet scanned, at most


def _count_nonfinite(t: torch.Tensor) -> int:
    flat = t.reshape(-1)
    step = 1 << 22     # count in chunks: a full-size bool mask would cost 1 byte per element
    return sum(int((~torch.isfinite(flat[i:i + step])).sum()) for i in range(0, flat.numel(), step))


def _judge(name: str, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, path: object,
           dtype: torch.dtype | None) -> None:
    """Raise for NaN/Inf in ``t`` or a cast to ``dtype`` that overflows, given ``t``'s min and max."""
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = _count_nonfinite(t)
        if bad:
            raise NonFiniteWeights(f"{bad} NaN/Inf value(s)", path=path, tensor=name, fix=_FIX)
    if dtype is None or dtype == t.dtype or not dtype.is_floating_point:
        return
    ends = torch.stack([lo, hi]).to(dtype)
    if bool(torch.isfinite(ends).all()):
        return
    big = max(abs(float(lo)), abs(float(hi)))
    fmax = torch.finfo(dtype).max
    raise NonFiniteWeights(f"casting to {dtype_name(dtype)} overflows: max |value| {big:.6g} is outside "
                           f"{dtype_name(dtype)}'s range ±{fmax:.6g}", path=path, tensor=name,
                           fix="pick a wider --dtype (e.g. bf16 or fp32), or pass --allow-nonfinite to write Inf")


def check_finite(name: str, t: torch.Tensor, path: object, allow: bool,
                 dtype: torch.dtype | None = None) -> None:
    """Refuse NaN/Inf in ``t``, and (``dtype`` given) a cast to ``dtype`` that would turn a finite
    value into Inf. One pass over the tensor (min and max); casting is monotone, so the cast
    overflows iff casting the value of largest magnitude does."""
    if allow or not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)     # one pass, no mask; NaN propagates into lo/hi
    _judge(name, t, lo, hi, path, dtype)


def scan(t: torch.Tensor, *, check: bool, cast: torch.dtype | None, digest: bool) -> tuple:
    """One pass over ``t`` in pieces: (min, max) of the values when ``check`` (None for non-float or
    empty tensors), and the SHA-256 hex digest of ``t.to(cast)``'s contiguous bytes when ``digest``."""
    flat = t.detach().reshape(-1)
    out_dtype = cast or t.dtype
    check = check and t.is_floating_point() and flat.numel() > 0
    h = hashlib.sha256() if digest else None
    step = max(1, _PIECE // max(t.element_size(), out_dtype.itemsize))
    lo = hi = None
    for at in range(0, flat.numel(), step):
        piece = flat[at:at + step]
        if check:
            a, b = torch.aminmax(piece)
            lo, hi = (a, b) if lo is None else (torch.minimum(lo, a), torch.maximum(hi, b))
        if h is not None:
            cast_piece = piece.to(out_dtype).contiguous()
            h.update(memoryview(cast_piece.view(torch.uint8).numpy()))
    return (lo, hi), (h.hexdigest() if h is not None else None)


class StreamChecks:
    """The finite check and the fingerprints of a conversion, on one worker thread (module doc).

    ``submit(name, t, check_as=..., cast=..., fingerprint_as=...)``: check ``t`` (when ``check``;
    ``cast`` is the output dtype, for the overflow check) and fingerprint ``t.to(cast)`` as the
    manifest entry ``fingerprint_as`` (None: no entry). ``finish()`` waits and raises the first error."""

    def __init__(self, fingerprints, *, path: object, allow_nonfinite: bool):
        self.fingerprints, self.path, self.allow = fingerprints, path, allow_nonfinite
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def submit(self, name: str, t: torch.Tensor, *, check: bool = True, cast: torch.dtype | None = None,
               fingerprint_as: str | None = None) -> None:
        check = check and not self.allow and t.is_floating_point() and t.numel() > 0
        wanted = fingerprint_as is not None and self.fingerprints is not None and \
            self.fingerprints.wants(fingerprint_as)
        if not (check or wanted):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptconv-checks")
        self._pending.append(self._pool.submit(self._run, name, t, check, cast, fingerprint_as if wanted else None))
        while len(self._pending) > _QUEUE:
            self._pending.popleft().result()

    def _run(self, name, t, check, cast, fingerprint_as) -> None:
        (lo, hi), digest = scan(t, check=check, cast=cast, digest=fingerprint_as is not None)
        if check:
            _judge(name, t, lo, hi, self.path, cast)
        if fingerprint_as is not None:
            self.fingerprints.add_digest(fingerprint_as, tuple(t.shape), cast or t.dtype, digest)

    def finish(self) -> None:
        """Wait for every submitted tensor; raise the first error found."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@contextmanager
def checks_closed(checks: StreamChecks):
    """Stop ``checks``' worker thread however the block ends."""
    try:
        yield checks
    finally:
        checks.close()
