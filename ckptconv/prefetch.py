"""Warm the page cache for a checkpoint's data files in the background.

A CLI call spends ~3 s importing torch before it reads a byte. Commands that read whole
checkpoints (verify, fingerprint) first start a daemon thread that reads the data files into a
reused 32 MiB buffer (what `cat > /dev/null` does), before the heavy imports, so on a cold cache
the disk works while the interpreter imports. Bounded by half the memory the kernel reports
available, files of the given checkpoints interleaved in file order. Measured on the bench
machine (1.7 GB + 1.7 GB, cold): verify's wall time 4.5-4.9 s with this, 5.4-5.7 s with
``posix_fadvise(WILLNEED)`` hints (capped by the kernel at its read-ahead size per call), 5.5-6.2 s
with 1 MiB reads (each read re-takes the GIL from the importing thread, up to a switch interval
per read). Imports nothing heavy (no torch).
"""
from __future__ import annotations

import os
import threading
from itertools import zip_longest
from pathlib import Path

DATA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
CHUNK = 32 << 20         # few GIL round trips while the main thread imports


def data_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint data files under ``path`` (a file or a directory), sorted."""
    p = Path(path)
    if p.is_file():
        return [p] if p.suffix in DATA_SUFFIXES else []
    if not p.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root, f) for f in sorted(files) if f.endswith(DATA_SUFFIXES)]
    return out


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def plan(paths, budget: int) -> list[tuple[Path, int]]:
    """(file, bytes to hint) for the files of ``paths``, interleaved path by path in file order,
    until ``budget`` bytes are planned."""
    order = [f for group in zip_longest(*(data_files(p) for p in paths)) for f in group if f is not None]
    out, left = [], budget
    for f in order:
        if left <= 0:
            break
        try:
            size = f.stat().st_size
        except OSError:
            continue
        out.append((f, min(size, left)))
        left -= size
    return out


def _read(files: list[tuple[Path, int]]) -> None:
    buf = memoryview(bytearray(CHUNK))
    for f, n in files:
        try:
            with open(f, "rb", buffering=0) as fh:
                while n > 0:
                    k = fh.readinto(buf[:min(CHUNK, n)])
                    if not k:
                        break
                    n -= k
        except OSError:
            continue


def start_prefetch(paths, budget: int | None = None) -> threading.Thread | None:
    """Start reading the data files of ``paths`` on a daemon thread; returns it (None when there
    is nothing to read)."""
    files = plan(paths, mem_available() // 2 if budget is None else budget)
    if not files:
        return None
    t = threading.Thread(target=_read, args=(files,), name="ckptconv-prefetch", daemon=True)
    t.start()
    return t
