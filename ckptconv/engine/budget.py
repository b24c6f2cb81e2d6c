"""The engine's byte budget: a pool of equal block buffers for row streams (``engine.rows``),
and the hashing thread that fingerprints the blocks read into it.

``Budget.take`` waits for a ``give`` rather than go over ``limit``; ``peak`` is the most buffer
bytes the engine ever held; ``over`` lists whole tensors larger than the limit that had to be held
anyway. ``hash_into`` hashes a piece of a block on the budget's one hashing thread, in order, and
``give`` returns the block to the pool only once the hashes reading it are done.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

DEFAULT_BUDGET = 256 << 20
SLOTS = 8                 # the budget is cut into this many block buffers


class Budget:
    """A pool of equal block buffers whose total never exceeds ``limit`` bytes (``take`` waits for a
    ``give`` when it would); ``peak``: the most bytes held at once; ``over``: whole tensors larger
    than the limit that had to be held anyway (their name and bytes)."""

    def __init__(self, limit: int = DEFAULT_BUDGET):
        self.limit = int(limit)
        self.block_bytes = max(4096, self.limit // SLOTS)
        self._cv = threading.Condition()
        self._free: list[torch.Tensor] = []
        self._out: dict[int, torch.Tensor] = {}     # storage address -> pool buffer (free or handed out)
        self.held = 0                      # bytes allocated by the pool (free + handed out)
        self.peak = 0
        self.over: list[tuple[str, int]] = []
        # one read at a time: the streams' reading threads and the engine's own whole-tensor reads
        # share the source readers, which are not thread-safe
        self.io_lock = threading.RLock()
        self._hasher: ThreadPoolExecutor | None = None
        self._hashing: dict[int, Future] = {}       # pool buffer -> the last hash reading it

    def take(self, nbytes: int, what: str = "") -> torch.Tensor:
        """A uint8 buffer of ``nbytes``: a pooled block when it fits one, else its own allocation
        (counted; beyond the limit it is listed in ``over``). Hand it back with ``give``."""
        with self._cv:
            if nbytes <= self.block_bytes:
                while not self._free and self.held + self.block_bytes > self.limit:
                    self._cv.wait()
                if self._free:
                    root = self._free.pop()
                    self._out[root.untyped_storage().data_ptr()] = root
                else:
                    root = self._new(self.block_bytes)
                return root[:nbytes]
            while self.held + nbytes > self.limit and self.held > len(self._free) * self.block_bytes:
                self._cv.wait()                      # wait for the handed-out blocks to come back
            self._drop_free()
            if nbytes > self.limit:
                self.over.append((what, nbytes))
            return self._new(nbytes)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer from ``take`` (or any view of it) to the pool, once the hashes reading
        it are done."""
        key = buf.untyped_storage().data_ptr()
        with self._cv:
            hashing = self._hashing.pop(key, None)
        if hashing is not None:
            hashing.result()
        with self._cv:
            root = self._out.pop(key)
            if root.numel() == self.block_bytes:
                self._free.append(root)
            else:
                self.held -= root.numel()
            self._cv.notify_all()

    def hash_into(self, h, piece: torch.Tensor) -> Future:
        """``h.update`` with the bytes of ``piece`` (contiguous) on the budget's hashing thread, in
        the order asked: the reading thread goes on reading while the fingerprint is computed, and
        a pool buffer is not handed out again before the hashes reading it are done (``give``)."""
        with self._cv:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptconv-fingerprint")
            done = self._hasher.submit(h.update, memoryview(piece.reshape(-1).view(torch.uint8).numpy()))
            key = piece.untyped_storage().data_ptr()
            if key in self._out:
                self._hashing[key] = done      # one thread, in order: the last one done, all are
        return done

    def _new(self, nbytes: int) -> torch.Tensor:
        root = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.held += root.numel()
        self.peak = max(self.peak, self.held)
        self._out[root.untyped_storage().data_ptr()] = root
        return root

    def summary(self) -> dict:
        """What a conversion's summary says about its memory: the budget, the most row-buffer bytes
        held at once, and the tensors that had to be held whole beyond the budget."""
        return {"memory_budget_bytes": self.limit, "buffered_peak_bytes": self.peak,
                "whole_tensors_over_budget": [f"{n} ({b} bytes)" for n, b in self.over]}

    def note_whole(self, what: str, nbytes: int) -> None:
        """A whole tensor is held outside the pool (a writer or source that cannot stream)."""
        with self._cv:
            self.peak = max(self.peak, self.held + nbytes)
            if nbytes > self.limit:
                self.over.append((what, nbytes))

    def can_read_ahead(self) -> bool:
        """Whether the pool has its full ``SLOTS`` blocks: room for a primed block of the next
        tensor beside the blocks of the one being written (``RowStream.prime``)."""
        return self.limit >= SLOTS * self.block_bytes

    def _drop_free(self) -> None:
        self.held -= len(self._free) * self.block_bytes
        self._free.clear()
