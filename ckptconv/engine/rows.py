"""Stream a tensor by row blocks under a byte budget the engine enforces.

``RowStream`` is one output tensor described, not held: its shape and dtype, and the runs of
source rows it is made of (``ops.rows.Run``: output rows ``[out, out+n)`` are rows ``[at, at+n)``
of input ``src``, or zeros). A writer asks for ``blocks(start, stop[, cols])`` and gets the rows in
order as contiguous tensors of at most ``Budget.block_bytes``; each block is read straight from
the source files into a buffer of the engine's pool (``Budget``), one block ahead on a reading
thread, so reading overlaps writing and memory does not depend on the largest tensor.

The checks ride on the reads: each ``Target`` (an HF-logical tensor to fingerprint and/or check
for NaN/Inf, located as segments of the inputs' rows) is fed every piece of input rows the
moment it is read, if it is the target's next piece: aminmax and SHA-256 on bytes that are hot in
cache. A target a writer did not read in order (or at all) is completed by ``finish_targets``,
which reads its missing rows again. ``Budget.peak`` is the most buffer bytes the engine ever held;
a whole-tensor read (``tensor()``, for writers or sources that cannot stream) is counted there and
listed in ``Budget.over`` when it is larger than the budget.
"""
from __future__ import annotations

import hashlib
import math
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..ops.rows import Run, overlapping
from ..types import TensorMeta
from .budget import Budget
from .checks import _judge

@dataclass
class Source:
    """One input of a stream: its meta and ``read(start, stop, out)`` filling ``out`` (contiguous,
    ``[stop - start, *rest]``, the input's dtype) with rows ``[start, stop)``; ``read`` None: only a
    whole-tensor ``load()`` is possible."""
    meta: TensorMeta
    read: Callable[[int, int, torch.Tensor], object] | None
    load: Callable[[], torch.Tensor]


@dataclass
class Target:
    """An HF-logical tensor checked and/or fingerprinted from the stream's reads: ``segments`` are
    (input index, first row, rows) in the tensor's own row order."""
    name: str
    shape: tuple[int, ...]
    segments: tuple[tuple[int, int, int], ...]
    check: bool
    cast: torch.dtype | None
    fingerprint: bool
    _seg: int = 0
    _off: int = 0
    _h: object = field(default_factory=hashlib.sha256)
    _lo: torch.Tensor | None = None
    _hi: torch.Tensor | None = None
    _hashed: Future | None = None       # the last piece's hash (``Budget.hash_into``)

    @property
    def done(self) -> bool:
        return self._seg >= len(self.segments)

    def feed(self, k: int, at: int, rows: torch.Tensor, budget: Budget | None = None) -> bool:
        """Input ``k``'s rows ``[at, at + len(rows))`` were just read: take what is next for us
        (hashed on ``budget``'s hashing thread when given). True when this completed the target."""
        n = rows.shape[0] if rows.dim() else 1
        if self.done:
            return False
        while not self.done:
            src, first, count = self.segments[self._seg]
            want = first + self._off
            if src != k or not at <= want < at + n:
                return
            take = min(first + count, at + n) - want
            self._take(rows[want - at:want - at + take] if rows.dim() else rows, budget)
            self._off += take
            if self._off == count:
                self._seg, self._off = self._seg + 1, 0
        return self.done

    def _take(self, piece: torch.Tensor, budget: Budget | None) -> None:
        if self.check and piece.numel():
            a, b = torch.aminmax(piece)
            self._lo, self._hi = (a, b) if self._lo is None else (torch.minimum(self._lo, a), torch.maximum(self._hi, b))
        if self.fingerprint and piece.numel():
            out = (piece if self.cast in (None, piece.dtype) else piece.to(self.cast)).contiguous()
            if budget is None:
                self._h.update(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            else:
                self._hashed = budget.hash_into(self._h, out)

    def judge(self, load: Callable[[], torch.Tensor], path: object) -> None:
        """Raise for NaN/Inf or an overflowing cast (``load`` gives the tensor for the message)."""
        if self.check and self._lo is not None and not (bool(torch.isfinite(self._lo)) and bool(torch.isfinite(self._hi))
                                                        and self._cast_ok()):
            _judge(self.name, load(), self._lo, self._hi, path, self.cast)

    def _cast_ok(self) -> bool:
        if self.cast is None or self.cast == self._lo.dtype or not self.cast.is_floating_point:
            return True
        return bool(torch.isfinite(torch.stack([self._lo, self._hi]).to(self.cast)).all())

    def digest(self) -> str:
        if self._hashed is not None:
            self._hashed.result()
        return self._h.hexdigest()


class RowStream:
    """One output tensor as row blocks (module doc). ``inputs``: the sources its runs read."""

    streams_rows = True

    def __init__(self, meta: TensorMeta, inputs: list[Source], runs: tuple[Run, ...], budget: Budget,
                 targets: list[Target] = (), on_target: Callable[[Target], None] | None = None,
                 path: object = None):
        self.meta, self.inputs, self.runs, self.budget, self.path = meta, inputs, runs, budget, path
        self.targets, self.on_target = list(targets), on_target
        self.shape, self.dtype = tuple(meta.shape), meta.dtype
        self.nbytes = meta.nbytes
        self._rest = self.shape[1:]
        self._row_bytes = meta.dtype.itemsize * math.prod(self._rest)
        self._src_dtype = inputs[0].meta.dtype if inputs else meta.dtype
        self._whole: dict[int, torch.Tensor] = {}
        self._primed: tuple[tuple[int, int], torch.Tensor] | None = None

    # -- what writers call -------------------------------------------------------------------
    def blocks(self, start: int = 0, stop: int | None = None,
               cols: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """Rows ``[start, stop)`` in order, as contiguous blocks (narrowed to columns ``cols`` of
        dim 1 when given); a block is valid until the next one is asked for."""
        stop = self.shape[0] if stop is None else stop
        if not self.shape:
            yield self.tensor()
            return
        spans = self._spans(start, stop)
        primed, self._primed = self._primed, None
        if primed is not None and (cols is not None or not spans or spans[0] != primed[0]):
            self.budget.give(primed[1])     # read for another call: the rows are read again
            primed = None
        rest = _Prefetch(spans[1:] if primed else spans, lambda span: self._block(*span, cols), self.budget)
        try:
            if primed is not None:
                try:
                    yield primed[1]
                finally:
                    self.budget.give(primed[1])
            yield from rest
        finally:
            rest.close()
            self._whole.clear()            # whole inputs of sources that cannot slice: not kept

    def prime(self) -> None:
        """Read the first block of ``blocks()`` now, on the caller's thread: the engine reads (and
        checks and fingerprints) the next tensor's first rows while the writer's thread is still
        writing the previous tensor. A later ``blocks()`` call that starts elsewhere, or narrows
        columns, returns the block to the pool and reads its own."""
        if self._primed is None and self.shape and self.shape[0] and self.budget.can_read_ahead():
            span = self._spans(0, self.shape[0])[0]
            self._primed = (span, self._block(*span, None))

    def _spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        src_row = self._src_dtype.itemsize * math.prod(self._rest)
        per = max(1, self.budget.block_bytes // max(self._row_bytes, src_row, 1))
        return [(a, min(a + per, stop)) for a in range(start, stop, per)]

    def tensor(self) -> torch.Tensor:
        """The whole tensor, for writers that cannot take blocks (noted by the budget)."""
        self.budget.note_whole(self.meta.name, self.nbytes)
        if not self.shape:
            with self.budget.io_lock:
                t = self.inputs[0].load().reshape(())
            self._feed(0, 0, t)
            return t.to(self.dtype)
        out = torch.empty(self.shape, dtype=self._src_dtype)
        for run in self.runs:
            dst = out[run.out:run.out + run.n]
            if run.src < 0:
                dst.zero_()
            else:
                self._read_into(run.src, run.at, run.at + run.n, dst)
                self._feed(run.src, run.at, dst)
        self._whole.clear()
        return out.to(self.dtype)

    # -- the engine's side ---------------------------------------------------------------------
    def finish_targets(self) -> None:
        """Complete the targets the writers did not read in order (reading their missing rows
        again), then judge and report them; call once no writer reads this stream any more."""
        for t in self.targets:
            if t.done:
                continue
            while not t.done:
                k, a, n = t.segments[t._seg]
                lo = a + t._off
                e = min(a + n, lo + max(1, self.budget.block_bytes // max(self._in_row_bytes(k), 1)))
                buf = self._read_input(k, lo, e)
                try:
                    t.feed(k, lo, buf, self.budget)
                finally:
                    self.budget.give(buf)
            self._complete(t)
        self._whole.clear()

    # -- internals -------------------------------------------------------------------------------
    def _block(self, a: int, b: int, cols) -> torch.Tensor:
        rows = self._fill(a, b, self._src_dtype)
        if self._src_dtype != self.dtype:
            cast = self.budget.take((b - a) * self._row_bytes).view(self.dtype).view(b - a, *self._rest)
            cast.copy_(rows)
            self.budget.give(rows)
            rows = cast
        if cols is not None:
            part = rows.narrow(1, cols[0], cols[1] - cols[0])
            out = self.budget.take(part.numel() * part.element_size()).view(self.dtype).view(part.shape)
            out.copy_(part)
            self.budget.give(rows)
            rows = out
        return rows

    def _fill(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Output rows ``[a, b)`` (before any cast) in a pool buffer, read run by run straight into it."""
        buf = self.budget.take((b - a) * dtype.itemsize * math.prod(self._rest))
        rows = buf.view(dtype).view(b - a, *self._rest)
        for run, lo, hi in overlapping(self.runs, a, b):
            dst = rows[lo - a:hi - a]
            if run.src < 0:
                dst.zero_()
                continue
            first = run.at + lo - run.out
            self._read_into(run.src, first, first + hi - lo, dst)
            self._feed(run.src, first, dst)
        return rows

    def _feed(self, k: int, at: int, rows: torch.Tensor) -> None:
        for t in self.targets:
            if not t.done and t.feed(k, at, rows, self.budget):
                self._complete(t)

    def _complete(self, t: Target) -> None:
        t.judge(lambda: self._target_tensor(t), self.path)
        if self.on_target is not None:
            self.on_target(t)

    def _read_into(self, k: int, a: int, b: int, dst: torch.Tensor) -> None:
        s = self.inputs[k]
        if s.read is not None and s.meta.dtype == dst.dtype:
            with self.budget.io_lock:
                s.read(a, b, dst)
        else:
            dst.copy_(self._load(k)[a:b])

    def _read_input(self, k: int, a: int, b: int) -> torch.Tensor:
        meta = self.inputs[k].meta
        buf = self.budget.take((b - a) * self._in_row_bytes(k))
        rows = buf.view(meta.dtype).view(b - a, *meta.shape[1:])
        self._read_into(k, a, b, rows)
        return rows

    def _in_row_bytes(self, k: int) -> int:
        meta = self.inputs[k].meta
        return meta.dtype.itemsize * math.prod(meta.shape[1:])

    def _load(self, k: int) -> torch.Tensor:
        """The whole input ``k``, kept until ``finish_targets`` (a source that cannot slice)."""
        if k not in self._whole:
            meta = self.inputs[k].meta
            self.budget.note_whole(meta.name, meta.nbytes)
            with self.budget.io_lock:
                self._whole[k] = self.inputs[k].load()
        return self._whole[k]

    def _target_tensor(self, t: Target) -> torch.Tensor:
        parts = []
        for k, a, n in t.segments:
            meta = self.inputs[k].meta
            out = torch.empty((n, *meta.shape[1:]), dtype=meta.dtype)
            self._read_into(k, a, a + n, out)
            parts.append(out)
        return torch.cat(parts) if parts else torch.empty(0)


class _Prefetch:
    """``make(span)`` for each span on a reading thread (started at once), one block ahead of the
    consumer; each block goes back to the pool when the consumer asks for the next one, and
    ``close`` (also when nothing was consumed) stops the thread and returns what it holds."""

    def __init__(self, spans: list, make: Callable, budget: Budget):
        self.spans, self.make, self.budget = spans, make, budget
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._th = None
        if len(spans) > 1:
            self._th = threading.Thread(target=self._produce, name="ckptconv-read", daemon=True)
            self._th.start()

    def _produce(self) -> None:
        try:
            for span in self.spans:
                if self._stop.is_set():
                    return
                block = self.make(span)
                while not self._stop.is_set():
                    try:
                        self._q.put((block, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                else:
                    self.budget.give(block)
                    return
        except BaseException as e:  # noqa: BLE001 - raised in the consumer
            self._q.put((None, e))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for span in self.spans:
            if self._th is None:
                block = self.make(span)
            else:
                block, err = self._q.get()
                if err is not None:
                    raise err
            try:
                yield block
            finally:
                self.budget.give(block)

    def close(self) -> None:
        if self._th is None:
            return
        self._stop.set()
        while self._th.is_alive() or not self._q.empty():
            try:
                block, _ = self._q.get(timeout=0.05)
                if block is not None:
                    self.budget.give(block)
            except queue.Empty:
                continue
        self._th.join()
        self._th = None
