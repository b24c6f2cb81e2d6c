"""What the engine overlaps with its reads: writes on a worker thread, a source's integrity check.

The engine reads and transforms the next tensor while the previous one is written (file writes,
torch copies and hashlib release the GIL).

``WriteBehind(writer)`` forwards ``write(name, tensor)`` to ``writer.write`` on one thread, at most
``depth`` writes queued (each holds its tensor: memory grows by ``depth`` tensors, not more).
The first error of a write is raised by the next ``write`` or on leaving the ``with`` block, which
waits for every queued write, so the caller's writer is only closed or aborted once nothing is
writing into its files any more.

Both wrappers read ahead for a writer that reads row streams from their first row
(``primes_row_streams``): ``write`` primes the stream (``RowStream.prime``: its first block is
read, checked and fingerprinted on the engine's thread) before handing it over, while the writer's
thread is still busy with the previous tensor. Most tensors are one block, so without this the
writer's thread would read, hash and write each of them in turn.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor


class WriteBehind:
    def __init__(self, writer, depth: int = 1):
        self.writer, self.depth = writer, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptconv-write")
        self._pending: deque[Future] = deque()

    def write(self, name: str, tensor) -> None:
        ahead(self.writer, tensor)
        self._pending.append(self._pool.submit(self.writer.write, name, tensor))
        while len(self._pending) > self.depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:
                for f in self._pending:
                    f.cancel()
                for f in self._pending:
                    if not f.cancelled():
                        f.exception()        # wait; the error in flight is the caller's already
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)


class _Direct:
    """The writer itself, for writers that already write on their own thread."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, name: str, tensor) -> None:
        ahead(self.writer, tensor)
        self.writer.write(name, tensor)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def ahead(writer, tensor) -> None:
    """Read a row stream's first block now when ``writer`` will read the stream from its start."""
    if getattr(writer, "primes_row_streams", False) and hasattr(tensor, "prime"):
        tensor.prime()


def behind(writer, depth: int = 1):
    """``WriteBehind(writer)``, or the writer itself when it writes in the background already
    (``writes_in_background``: the torch_dist writer's save thread)."""
    return _Direct(writer) if getattr(writer, "writes_in_background", False) else WriteBehind(writer, depth)


def background_integrity_check(source, share=None) -> None:
    """Start a source's integrity check (a torch_dist integrity.json) on a thread, when it has one;
    a worker (``share``: an engine.workers.Share) checks its share of the files: the output is
    committed only when every worker succeeded, so every file is still checked once."""
    start = getattr(source, "check_integrity_in_background", None)
    if start is not None:
        start(None if share is None else (share.rank, share.world))


def finish_integrity_check(source) -> None:
    """Wait for the source's integrity check and raise what it found (call before committing)."""
    done = getattr(source, "verify_integrity", None)
    if done is not None:
        done()
