"""Row streams: the first block read ahead (``RowStream.prime``) and fingerprints hashed on the
budget's hashing thread (``Budget.hash_into``) give the bytes and digests of a plain read."""
import hashlib
import threading
import time

import torch

from ckptconv.engine.overlap import WriteBehind, _Direct
from ckptconv.engine.budget import Budget
from ckptconv.engine.rows import RowStream, Source, Target
from ckptconv.ops.rows import Run
from ckptconv.types import TensorMeta

ROWS, COLS = 96, 64                      # bf16: 128 bytes a row


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16)
    b = torch.randn(ROWS // 2, COLS, generator=g).to(torch.bfloat16)
    reads = []

    def source(name, t):
        def read(lo, hi, out):
            reads.append((name, lo, hi, threading.current_thread().name))
            out.copy_(t[lo:hi])
        return Source(TensorMeta(name, tuple(t.shape), t.dtype), read, lambda: t.clone())
    return a, b, [source("a", a), source("b", b)], reads


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class _SlowHash:
    """A SHA-256 that takes its time and copies the bytes only at the end of each update: a pool
    buffer reused before its hash is done would be hashed with the next read's rows."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, view) -> None:
        time.sleep(0.01)
        self._h.update(bytes(view))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _stream(budget: Budget, seed: int = 0, slow: bool = False):
    a, b, inputs, reads = _inputs(seed)
    # output = b's rows, then a's: two inputs, runs that cross blocks
    runs = (Run(0, 1, 0, ROWS // 2), Run(ROWS // 2, 0, 0, ROWS))
    targets = [Target(n, tuple(t.shape), ((k, 0, t.shape[0]),), check=True, cast=None, fingerprint=True)
               for k, (n, t) in enumerate((("a", a), ("b", b)))]
    if slow:
        for t in targets:
            t._h = _SlowHash()
    done = []
    s = RowStream(TensorMeta("out", (ROWS + ROWS // 2, COLS), torch.bfloat16), inputs, runs, budget, targets,
                  on_target=done.append)
    return s, torch.cat([b, a]), {"a": _digest(a), "b": _digest(b)}, done, reads


def _collect(stream, **kw) -> torch.Tensor:
    return torch.cat([blk.clone() for blk in stream.blocks(**kw)])


def test_blocks_and_digests_under_a_slow_hash_and_a_reused_pool():
    budget = Budget(8 * 4096)           # 8 blocks of 32 rows: the same buffers come back again and again
    for seed in range(3):
        s, want, digests, done, _ = _stream(budget, seed, slow=True)
        assert torch.equal(_collect(s), want)
        s.finish_targets()
        assert {t.name: t.digest() for t in done} == digests
    assert budget.peak <= budget.limit


def test_primed_stream_gives_the_same_bytes_and_reads_its_first_block_once():
    budget = Budget(8 * 4096)
    s, want, digests, done, reads = _stream(budget)
    s.prime()
    primed = list(reads)
    assert primed and all(r[3] == threading.current_thread().name for r in primed)
    assert torch.equal(_collect(s), want)
    s.finish_targets()
    assert {t.name: t.digest() for t in done} == digests
    first = [r for r in reads if r[0] == "b" and r[1] == 0]
    assert len(first) == 1                           # the primed rows were not read again


def test_primed_stream_read_another_way_is_still_right():
    budget = Budget(8 * 4096)
    s, want, digests, done, _ = _stream(budget)
    s.prime()
    held = budget.held
    got = _collect(s, start=0, stop=want.shape[0], cols=(8, 40))      # not the primed block's shape
    assert torch.equal(got, want[:, 8:40])
    s.finish_targets()
    assert {t.name: t.digest() for t in done} == digests
    assert held > 0 and not budget._out                               # every buffer came back


def test_write_wrappers_prime_only_for_writers_that_read_from_the_start():
    class Writer:
        def __init__(self, primes):
            self.primes_row_streams, self.got = primes, []

        def write(self, name, t):
            self.got.append(_collect(t))

    for primes in (True, False):
        for wrap in (_Direct, WriteBehind):
            budget = Budget(8 * 4096)
            s, want, _, _, reads = _stream(budget)
            w = Writer(primes)
            with wrap(w) as out:
                out.write("out", s)
                if isinstance(out, WriteBehind):
                    out.drain()
            assert torch.equal(w.got[0], want)
            assert (reads[0][3] == threading.current_thread().name) == primes
